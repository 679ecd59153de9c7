// Backend::linear_swiglu in row slices (kSwigluRows at a time through a scratch of that many rows): on the
// CPU backend, a step of more rows than one slice, with a scratch of exactly one slice, against
// silu(x gate^T) * (x up^T) in double precision; the rows past the last slice untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "model/backend.hpp"

namespace ksa::engine {
namespace {

TEST(BackendSwiglu, SlicesCoverEveryRowOfALongStep) {
  constexpr int64_t K = 48, I = 40;
  const int64_t n = 2 * Backend::kSwigluRows + 37;  // two whole slices and a short one
  BackendOptions bo;
  bo.threads = 2;
  std::unique_ptr<Backend> b = make_cpu_backend(bo);
  StepDesc desc;
  desc.ids.assign(size_t(n), 0);
  desc.positions.assign(size_t(n), 0);
  b->begin_step(desc);

  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> wg(size_t(I * K)), wu(size_t(I * K));
  for (auto& v : wg) v = nd(rng);
  for (auto& v : wu) v = nd(rng);
  Weight gate, up;
  gate.data = wg.data(), gate.dtype = DType::f32, gate.rows = I, gate.cols = K, gate.nbytes = I * K * 4;
  up = gate;
  up.data = wu.data();

  Act x = b->act(n, K, Prec::narrow), out = b->act(n + 1, I, Prec::narrow);
  Act scratch = b->act(Backend::kSwigluRows, 2 * I, Prec::wide);
  ASSERT_EQ(x.dtype, DType::f32);
  float* xs = static_cast<float*>(x.data);
  for (int64_t i = 0; i < n * K; ++i) xs[i] = nd(rng);
  float* os = static_cast<float*>(out.data);
  for (int64_t i = 0; i < (n + 1) * I; ++i) os[i] = -7.f;  // the row past the step stays as it was
  out.rows = n;
  b->linear_swiglu(x, gate, up, out, scratch);

  int64_t bad = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < I; ++c) {
      double g = 0, u = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        g += double(xs[r * K + k]) * wg[size_t(c * K + k)];
        u += double(xs[r * K + k]) * wu[size_t(c * K + k)];
        mag += std::abs(double(xs[r * K + k])) * (std::abs(wg[size_t(c * K + k)]) + std::abs(wu[size_t(c * K + k)]));
      }
      const double ref = g / (1 + std::exp(-g)) * u;
      const double tol = 1e-5 * mag * (1 + std::abs(g) + std::abs(u));
      if (!(std::abs(os[r * I + c] - ref) <= tol) && bad++ < 5)
        ADD_FAILURE() << "row " << r << " col " << c << ": " << os[r * I + c] << ", reference " << ref;
    }
  EXPECT_EQ(bad, 0);
  for (int64_t c = 0; c < I; ++c) EXPECT_EQ(os[n * I + c], -7.f);
}

}  // namespace
}  // namespace ksa::engine
