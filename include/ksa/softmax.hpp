// The online-softmax state (flash style) shared by every kernel: prefill tiles, decode splits, and the join
// of window and summary partials. A partial over a set of keys is (m, l, acc) with m = max score,
// l = sum exp(s - m), acc = sum exp(s - m) * v. Partials over disjoint key sets merge exactly, in any order.
#pragma once
#include <cmath>

#include "ksa/config.hpp"

namespace ksa {

struct OnlineSoftmax {
  float m = -INFINITY;
  float l = 0.f;

  // Prepares to add scores whose maximum is `block_max`: raises m and returns the factor the caller must
  // multiply its accumulator by (0 when nothing was accumulated yet).
  KSA_HD float raise_max(float block_max) {
    const float mn = block_max > m ? block_max : m;
    const float a = (m == -INFINITY) ? 0.f : expf(m - mn);
    l *= a;
    m = mn;
    return a;
  }
  // Adds one score already known to be <= m; returns its weight exp(s - m).
  KSA_HD float add(float s) {
    const float p = (s == -INFINITY) ? 0.f : expf(s - m);
    l += p;
    return p;
  }
  // Merges another partial into this one; a_self and a_other are the factors for the two accumulators
  // (acc = a_self * acc + a_other * acc_other).
  KSA_HD void merge(const OnlineSoftmax& o, float& a_self, float& a_other) {
    const float mn = o.m > m ? o.m : m;
    if (mn == -INFINITY) {
      a_self = a_other = 0.f;
      return;
    }
    a_self = (m == -INFINITY) ? 0.f : expf(m - mn);
    a_other = (o.m == -INFINITY) ? 0.f : expf(o.m - mn);
    l = l * a_self + o.l * a_other;
    m = mn;
  }
  KSA_HD bool empty() const { return !(l > 0.f); }
  // Natural-log sum of exp(scores) over all keys added.
  KSA_HD float lse() const { return m + logf(l); }
  // Factor that turns acc into the softmax-weighted output.
  KSA_HD float inv_sum() const { return 1.f / l; }
};

// Merges partial (o, acc_o) into (s, acc) over D accumulator entries.
template <class Acc>
KSA_HD void merge_partial(OnlineSoftmax& s, Acc* acc, const OnlineSoftmax& o, const Acc* acc_o, int D) {
  float a, b;
  s.merge(o, a, b);
  for (int d = 0; d < D; ++d) acc[d] = Acc(a * float(acc[d]) + b * float(acc_o[d]));
}

}  // namespace ksa
