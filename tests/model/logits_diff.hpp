// Comparing logits (tests/model): the largest absolute difference with its index, a gtest assertion that
// prints the worst logit and never lets NaN pass (docs/design.md: tolerances), and the bound of the engine against the
// double-precision reference forward. Used by engine_test.cpp and quant_model_test.cpp.
#pragma once
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace ksa::test {

// Engine vs the double reference: <= kNaiveMultiple x (naive fp32 error) + kFloorRel x max|logit|.
// Measured on engine_test.cpp's cases over 12 seed offsets: engine <= 1.6e-6 of max|logit|, naive fp32 <= 1.7e-6; the
// bound is about 6e-6 of max|logit| (kFloorRel ~ 17 fp32 ulps of the largest logit). Every semantic slip tried on the
// reference (W off by one, a summary position off by one, mix_coeff 1% off, the summary layernorm or projections
// ignored, summaries updated in a plain layer, a wrong GQA head map) moves the logits by 3e-3 .. 1.5 of max|logit|:
// hundreds of times the bound.
constexpr double kNaiveMultiple = 4.0;
constexpr double kFloorRel = 2e-6;

// max |got - want| over all entries, with the worst index; non-finite values on either side are reported.
struct Diff {
  double max_err = 0, max_abs = 0;  // max_abs: largest |want|
  int64_t worst = -1;
  double got = 0, want = 0;
  int64_t nonfinite = -1;  // first index of a NaN/inf, or -1
  double rel() const { return max_abs > 0 ? max_err / max_abs : max_err; }
};

template <class A, class B>
Diff diff(const std::vector<A>& got, const std::vector<B>& want) {
  Diff d;
  if (got.size() != want.size()) {
    d.nonfinite = 0;
    return d;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = double(got[i]), w = double(want[i]);
    if (!std::isfinite(g) || !std::isfinite(w)) {
      if (d.nonfinite < 0) d.nonfinite = int64_t(i);
      continue;
    }
    d.max_abs = std::max(d.max_abs, std::abs(w));
    const double e = std::abs(g - w);
    if (e > d.max_err || d.worst < 0) {
      if (e > d.max_err) d.max_err = e;
      if (e >= d.max_err) {
        d.worst = int64_t(i);
        d.got = g;
        d.want = w;
      }
    }
  }
  return d;
}

inline std::string explain(const Diff& d, int64_t V, double tol) {
  std::ostringstream os;
  os.precision(9);
  if (d.nonfinite >= 0) os << "non-finite value or size mismatch at index " << d.nonfinite << "; ";
  os << "max |err| " << d.max_err << " (" << d.rel() << " of max |logit| " << d.max_abs << ") > tolerance " << tol;
  if (d.worst >= 0 && V > 0)
    os << "; worst at text token " << d.worst / V << ", logit " << d.worst % V << ": got " << d.got << ", want "
       << d.want;
  return os.str();
}

// Passes when every value is finite and max |err| <= tol (written so that NaN fails).
inline ::testing::AssertionResult within(const Diff& d, double tol, int64_t V) {
  if (d.nonfinite < 0 && d.worst >= 0 && d.max_err <= tol) return ::testing::AssertionSuccess();
  if (d.nonfinite < 0 && d.worst < 0) return ::testing::AssertionFailure() << "empty comparison";
  return ::testing::AssertionFailure() << explain(d, V, tol);
}

inline int64_t argmax(std::span<const float> row) { return std::max_element(row.begin(), row.end()) - row.begin(); }

}  // namespace ksa::test
