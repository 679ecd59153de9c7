// The problem shapes shared by the CUDA forward and backward tests (tests/cuda): the geometry, its trace line,
// random shapes and params with their q, k, v views.
#pragma once
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>

#include "ksa/attention.hpp"

namespace ksa::test {

struct Shape {
  int64_t k, S, T, W, Hq, Hkv, D, B;
  bool tail;
  DType dt;
  bool strided;
  bool det = false;  // backward only: deterministic
};

inline std::string describe(const Shape& s) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "k=%lld S=%lld T=%lld W=%lld H=%lld/%lld D=%lld B=%lld tail=%d %s strided=%d det=%d",
                (long long)s.k, (long long)s.S, (long long)s.T, (long long)s.W, (long long)s.Hq, (long long)s.Hkv,
                (long long)s.D, (long long)s.B, int(s.tail), dtype_name(s.dt), int(s.strided), int(s.det));
  return buf;
}

// A random shape with 1..max_T text tokens (det stays false).
inline Shape random_shape(std::mt19937_64& rng, int64_t max_T) {
  Shape s;
  s.k = 1 + int64_t(rng() % 20);
  s.S = 1 + int64_t(rng() % 3);
  s.T = 1 + int64_t(rng() % uint64_t(max_T));
  s.W = int64_t(rng() % 10);
  s.Hkv = 1 + int64_t(rng() % 2);
  s.Hq = s.Hkv * (int64_t(1) << (rng() % 3));
  s.D = rng() % 2 ? 64 : 128;
  s.B = 1 + int64_t(rng() % 2);
  s.tail = rng() % 2;
  s.dt = rng() % 2 ? DType::bf16 : DType::f16;
  s.strided = rng() % 2;
  return s;
}

// Params P of shape s with its q, k, v views: q rows of rowq elements; strided, k and v are slices of q's fused
// [B, L, Hq+2Hkv, D] rows (k and v unused), else dense buffers.
template <class P>
P qkv_params(const Shape& s, const Layout& lay, int64_t rowq, uint16_t* q, uint16_t* k, uint16_t* v) {
  P p = shaped_params<P>(lay, s.W, s.B, s.Hq, s.Hkv, s.D, s.dt);
  const int64_t L = lay.length();
  p.q = TensorView{q, L * rowq, rowq, s.D};
  if (s.strided) {
    p.k = TensorView{q + s.Hq * s.D, L * rowq, rowq, s.D};
    p.v = TensorView{q + (s.Hq + s.Hkv) * s.D, L * rowq, rowq, s.D};
  } else {
    p.k = TensorView::dense(k, L, s.Hkv, s.D);
    p.v = TensorView::dense(v, L, s.Hkv, s.D);
  }
  return p;
}

}  // namespace ksa::test
