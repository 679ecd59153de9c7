// CPU forward: tiled online softmax over only the key tiles that key_spans returns (gathered order).
// Placeholder-simple version: scalar loops; to be replaced by the optimised kernel.
#include <algorithm>
#include <cmath>
#include <vector>

#include <omp.h>

#include "ksa/cpu.hpp"
#include "ksa/error.hpp"
#include "ksa/softmax.hpp"

namespace ksa::cpu {

void attention_forward(const AttentionParams& p) {
  validate(p);
  const Layout& lay = p.layout;
  const int64_t L = lay.length(), D = p.D, G = p.group();
  const float scale = p.softmax_scale();
  constexpr int64_t BQ = 16, BK = 64;
  const int64_t nqt = (L + BQ - 1) / BQ;
#pragma omp parallel for collapse(3) schedule(dynamic) num_threads(p.num_threads > 0 ? p.num_threads : omp_get_max_threads())
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t qt = 0; qt < nqt; ++qt) {
        const int64_t g0 = qt * BQ, g1 = std::min(L, g0 + BQ);
        const KeySpans sp = key_spans(lay, p.W, g0, g1);
        std::vector<float> qf(static_cast<size_t>(BQ * D)), acc(static_cast<size_t>(BQ * D), 0.f), kf(static_cast<size_t>(D)), vf(static_cast<size_t>(D));
        std::vector<OnlineSoftmax> st(static_cast<size_t>(BQ));
        std::vector<int64_t> qs(static_cast<size_t>(BQ));
        for (int64_t r = g0; r < g1; ++r) {
          qs[size_t(r - g0)] = lay.stream_of_gathered(r);
          for (int64_t d = 0; d < D; ++d)
            qf[size_t((r - g0) * D + d)] = load_as_float(p.dtype, p.q.data, p.q.offset(b, qs[size_t(r - g0)], h) + d);
        }
        for_each_key_tile(lay, sp, BK, [&](int64_t kb, int64_t ke, bool masked) {
          for (int64_t g = kb; g < ke; ++g) {
            const int64_t ks = lay.stream_of_gathered(g);
            for (int64_t d = 0; d < D; ++d) {
              kf[size_t(d)] = load_as_float(p.dtype, p.k.data, p.k.offset(b, ks, h / G) + d);
              vf[size_t(d)] = load_as_float(p.dtype, p.v.data, p.v.offset(b, ks, h / G) + d);
            }
            for (int64_t r = 0; r < g1 - g0; ++r) {
              if (masked && !visible(lay, p.W, qs[size_t(r)], ks)) continue;
              float s = 0;
              for (int64_t d = 0; d < D; ++d) s += qf[size_t(r * D + d)] * kf[size_t(d)];
              s *= scale;
              OnlineSoftmax& o = st[size_t(r)];
              const float a = o.raise_max(s);
              const float w = o.add(s);
              for (int64_t d = 0; d < D; ++d) acc[size_t(r * D + d)] = acc[size_t(r * D + d)] * a + w * vf[size_t(d)];
            }
          }
        });
        for (int64_t r = 0; r < g1 - g0; ++r) {
          const OnlineSoftmax& o = st[size_t(r)];
          for (int64_t d = 0; d < D; ++d)
            store_from_float(p.dtype, p.out.data, p.out.offset(b, qs[size_t(r)], h) + d, acc[size_t(r * D + d)] * o.inv_sum());
          if (p.lse) p.lse[(b * L + qs[size_t(r)]) * p.Hq + h] = o.lse();
        }
      }
}

}  // namespace ksa::cpu
