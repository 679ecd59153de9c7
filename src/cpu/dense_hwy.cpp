// The dense kernels' inner loops (dense_kernels.hpp), one Highway source compiled for every target Highway
// offers and chosen at run time (simd.cpp): the matrix-vector product over bf16/f32 weight rows, the bf16
// widening for the sgemm path, the same two over Q8_0 blocks (the product in integers, with the activations
// rounded to 8 bits per block), RMSNorm, the RoPE rotation and the SwiGLU gate.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/dense_hwy.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cmath>
#include <cstring>

#include "cpu/dense_kernels.hpp"
#include "cpu/simd-inl.hpp"
#include "cpu/simd.hpp"

HWY_BEFORE_NAMESPACE();
namespace ksa::cpu::detail {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::CappedTag<float, 16>;

// N weights at w (bf16 bits) as fp32: a bf16 is the top half of an fp32.
HWY_INLINE hn::Vec<DF> load_bf16(DF d, const uint16_t* HWY_RESTRICT w) {
  const hn::RebindToUnsigned<DF> du32;
  const hn::Rebind<uint16_t, DF> du16;
  return hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(du32, hn::LoadU(du16, w))));
}
template <class T>
HWY_INLINE hn::Vec<DF> load_w(DF d, const T* HWY_RESTRICT w) {
  if constexpr (sizeof(T) == 2) return load_bf16(d, w);
  else return hn::LoadU(d, w);
}
inline float scalar_w(const uint16_t* w, int64_t k) { return bf16::to_float(w[k]); }
inline float scalar_w(const float* w, int64_t k) { return w[k]; }

// y[m * ldy + n - n0] = W[n, :] . x[m, :] for m < M, n in [n0, n1): each weight row read once for all M
// vectors, two accumulators per vector.
template <int M, class T>
void gemv_t(const T* HWY_RESTRICT W, int64_t n0, int64_t n1, int64_t K, const float* HWY_RESTRICT x, float* y,
            int64_t ldy) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    hn::Vec<DF> a0[M], a1[M];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = hn::Zero(d);
    int64_t k = 0;
    for (; k + 2 * N <= K; k += 2 * N) {
      const auto w0 = load_w(d, w + k), w1 = load_w(d, w + k + N);
      HWY_UNROLL(4)
      for (int m = 0; m < M; ++m) {
        a0[m] = hn::MulAdd(w0, hn::LoadU(d, x + m * K + k), a0[m]);
        a1[m] = hn::MulAdd(w1, hn::LoadU(d, x + m * K + k + N), a1[m]);
      }
    }
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) {
      float s = hn::GetLane(hn::SumOfLanes(d, hn::Add(a0[m], a1[m])));
      for (int64_t kk = k; kk < K; ++kk) s += scalar_w(w, kk) * x[m * K + kk];
      y[m * ldy + (n - n0)] = s;
    }
  }
}

void gemv(const void* W, DType wdt, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
          int64_t ldy) {
  auto run = [&](auto* w) {
    switch (M) {
      case 1:
        gemv_t<1>(w, n0, n1, K, x, y, ldy);
        break;
      case 2:
        gemv_t<2>(w, n0, n1, K, x, y, ldy);
        break;
      case 3:
        gemv_t<3>(w, n0, n1, K, x, y, ldy);
        break;
      default:
        gemv_t<4>(w, n0, n1, K, x, y, ldy);
        break;
    }
  };
  if (wdt == DType::bf16) run(static_cast<const uint16_t*>(W));
  else run(static_cast<const float*>(W));
}

void widen_bf16(const uint16_t* HWY_RESTRICT w, int64_t count, float* HWY_RESTRICT out) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= count; i += N) hn::StoreU(load_bf16(d, w + i), d, out + i);
  for (; i < count; ++i) out[i] = bf16::to_float(w[i]);
}

// x[0:n) = x / sqrt(mean(x^2) + eps) * w.
template <class T>
void rms_norm_t(float* HWY_RESTRICT x, int64_t n, const T* HWY_RESTRICT w, float eps) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto a = hn::LoadU(d, x + i), b = hn::LoadU(d, x + i + N);
    s0 = hn::MulAdd(a, a, s0);
    s1 = hn::MulAdd(b, b, s1);
  }
  double ss = double(hn::GetLane(hn::SumOfLanes(d, hn::Add(s0, s1))));
  for (int64_t j = i; j < n; ++j) ss += double(x[j]) * x[j];
  const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
  const auto vinv = hn::Set(d, inv);
  i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(d, x + i), vinv), load_w(d, w + i)), d, x + i);
  for (; i < n; ++i) x[i] = x[i] * inv * scalar_w(w, i);
}

void rms_norm_row(float* x, int64_t n, const void* w, DType wdt, float eps) {
  if (wdt == DType::bf16) rms_norm_t(x, n, static_cast<const uint16_t*>(w), eps);
  else rms_norm_t(x, n, static_cast<const float*>(w), eps);
}

// One head: v[i], v[i + half] rotated by (cos[i], sin[i]) for i < half.
void rope_rotate(float* HWY_RESTRICT v, int64_t half, const float* HWY_RESTRICT c, const float* HWY_RESTRICT s) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= half; i += N) {
    const auto a = hn::LoadU(d, v + i), b = hn::LoadU(d, v + i + half);
    const auto vc = hn::LoadU(d, c + i), vs = hn::LoadU(d, s + i);
    hn::StoreU(hn::NegMulAdd(b, vs, hn::Mul(a, vc)), d, v + i);
    hn::StoreU(hn::MulAdd(a, vs, hn::Mul(b, vc)), d, v + i + half);
  }
  for (; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i] + a * s[i];
  }
}

// gate = gate * sigmoid(gate) * up.
void silu_mul(float* HWY_RESTRICT gate, const float* HWY_RESTRICT up, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto one = hn::Set(d, 1.f);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto g = hn::LoadU(d, gate + i);
    const auto sig = hn::Div(one, hn::Add(one, simd_exp(d, hn::Neg(g))));
    hn::StoreU(hn::Mul(hn::Mul(g, sig), hn::LoadU(d, up + i)), d, gate + i);
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// The scale of a Q8_0 block (fp16 little-endian in its first two bytes): normal numbers by bit moves, the
// rest (zero, subnormal, inf, NaN) through the core's converter.
HWY_INLINE float q8_scale(const unsigned char* b) {
  const uint16_t h = uint16_t(b[0] | (b[1] << 8));
  const uint32_t e = (h >> 10) & 0x1fu;
  if (e == 0 || e == 31) return f16::to_float(h);
  const uint32_t u = (uint32_t(h & 0x8000u) << 16) | ((e + 112u) << 23) | (uint32_t(h & 0x3ffu) << 13);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// N int8 quants as floats.
HWY_INLINE hn::Vec<DF> load_q8(DF d, const unsigned char* q) {
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<int8_t, DF> d8;
  return hn::ConvertTo(d, hn::PromoteTo(di, hn::LoadU(d8, reinterpret_cast<const int8_t*>(q))));
}

// The activations of a Q8_0 product rounded to 8 bits per block of 32 (dense_kernels.hpp): d = max|x| / 127
// in fp32, q = x / d rounded to the nearest integer, ties to even (NearestInt on every target), kept as int16
// for the integer products. A block holding a NaN or an infinity gets d = NaN (the sum of x * 0), so that
// the product's output is NaN as with fp32 activations; an all-zero block gets d = 0 and q = 0.
void quantize_x_q8(const float* HWY_RESTRICT x, int64_t n, int16_t* HWY_RESTRICT q, float* HWY_RESTRICT dx) {
  const DF d;
  const hn::Rebind<int16_t, DF> d16;
  const int N = int(hn::Lanes(d));
  const auto zero = hn::Zero(d), lo = hn::Set(d, -127.f), hi = hn::Set(d, 127.f);
  for (int64_t b = 0; b < n / 32; ++b) {
    const float* v = x + b * 32;
    auto amax = zero, nan = zero;
    for (int j = 0; j < 32; j += N) {
      const auto a = hn::LoadU(d, v + j);
      amax = hn::Max(amax, hn::Abs(a));
      nan = hn::Add(nan, hn::Mul(a, zero));
    }
    const float scale = hn::GetLane(hn::MaxOfLanes(d, amax)) / 127.f;
    dx[b] = scale + hn::GetLane(hn::SumOfLanes(d, nan));
    const auto div = hn::Set(d, scale > 0.f ? scale : 1.f);
    for (int j = 0; j < 32; j += N) {
      const auto t = hn::Min(hn::Max(hn::Div(hn::LoadU(d, v + j), div), lo), hi);
      hn::StoreU(hn::DemoteTo(d16, hn::NearestInt(t)), d16, q + b * 32 + j);
    }
  }
}

// As gemv_t over Q8_0 rows (K / 32 blocks of 34 bytes) with the activations rounded by quantize_x_q8: per
// block, the M integer dot products of the 32 weight quants with the 32 activation quants (int8 x int16 pairs
// summed into int32 lanes: _mm512_madd_epi16 / vpmaddwd on x86, vmlal_s16 on NEON; at most 32 * 127 * 127 in
// a lane, no overflow), then one fp32 multiply-add of the lanes by d_w * d_x into the accumulators. Two
// accumulators per vector (even and odd blocks) keep two multiply-add chains in flight; the weight scale
// comes from the fp16 table (f16_to_f32_table).
template <int M>
void gemv_q8_t(const unsigned char* HWY_RESTRICT W, int64_t n0, int64_t n1, int64_t K, const int16_t* HWY_RESTRICT xq,
               const float* HWY_RESTRICT xd, float* y, int64_t ldy) {
  const float* HWY_RESTRICT f16 = f16_to_f32_table();
  const hn::CappedTag<int16_t, 32> d16;  // at most one block per vector
  const hn::RepartitionToWide<decltype(d16)> d32;
  const hn::RebindToFloat<decltype(d32)> df;
  const hn::Rebind<int8_t, decltype(d16)> d8;
  const int N = int(hn::Lanes(d16));
  const int64_t nb = K / 32, row_bytes = nb * 34;
  using VF = hn::Vec<decltype(df)>;
  // acc[m] += (the 32 products of block b) * d_w * d_x for each m.
  auto block = [&](const unsigned char* HWY_RESTRICT w, int64_t b, VF* HWY_RESTRICT acc) HWY_ATTR {
    hn::Vec<decltype(d32)> s0[M], s1[M];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) s0[m] = s1[m] = hn::Zero(d32);
    for (int j = 0; j < 32; j += N) {
      const auto q = hn::PromoteTo(d16, hn::LoadU(d8, reinterpret_cast<const int8_t*>(w + 2 + j)));
      HWY_UNROLL(4)
      for (int m = 0; m < M; ++m)
        s0[m] = hn::ReorderWidenMulAccumulate(d32, q, hn::LoadU(d16, xq + m * K + b * 32 + j), s0[m], s1[m]);
    }
    const float dw = f16[w[0] | (w[1] << 8)];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m)
      acc[m] = hn::MulAdd(hn::ConvertTo(df, hn::Add(s0[m], s1[m])), hn::Set(df, dw * xd[m * nb + b]), acc[m]);
  };
  for (int64_t n = n0; n < n1; ++n) {
    const unsigned char* w = W + n * row_bytes;
    VF a0[M], a1[M];
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = hn::Zero(df);
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      block(w + b * 34, b, a0);
      block(w + (b + 1) * 34, b + 1, a1);
    }
    if (b < nb) block(w + b * 34, b, a0);
    HWY_UNROLL(4)
    for (int m = 0; m < M; ++m) y[m * ldy + (n - n0)] = hn::GetLane(hn::SumOfLanes(df, hn::Add(a0[m], a1[m])));
  }
}

void gemv_q8(const void* W, int64_t n0, int64_t n1, int64_t K, const int16_t* xq, const float* xd, int64_t M, float* y,
             int64_t ldy) {
  const auto* w = static_cast<const unsigned char*>(W);
  switch (M) {
    case 1:
      gemv_q8_t<1>(w, n0, n1, K, xq, xd, y, ldy);
      break;
    case 2:
      gemv_q8_t<2>(w, n0, n1, K, xq, xd, y, ldy);
      break;
    case 3:
      gemv_q8_t<3>(w, n0, n1, K, xq, xd, y, ldy);
      break;
    default:
      gemv_q8_t<4>(w, n0, n1, K, xq, xd, y, ldy);
      break;
  }
}

void dequantize_q8(const void* in, int64_t n, float* HWY_RESTRICT out) {
  const DF d;
  const int N = int(hn::Lanes(d));
  const auto* w = static_cast<const unsigned char*>(in);
  for (int64_t b = 0; b < n / 32; ++b, w += 34) {
    const auto sc = hn::Set(d, q8_scale(w));
    for (int j = 0; j < 32; j += N) hn::StoreU(hn::Mul(sc, load_q8(d, w + 2 + j)), d, out + b * 32 + j);
  }
}

float dot_row(const void* W, DType wdt, int64_t row, int64_t K, const float* x) {
  float y = 0.f;
  gemv(W, wdt, row, row + 1, K, x, 1, &y, 0);
  return y;
}

}  // namespace HWY_NAMESPACE
}  // namespace ksa::cpu::detail
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace ksa::cpu::detail {
HWY_EXPORT(gemv);
HWY_EXPORT(widen_bf16);
HWY_EXPORT(rms_norm_row);
HWY_EXPORT(rope_rotate);
HWY_EXPORT(silu_mul);
HWY_EXPORT(dot_row);
HWY_EXPORT(gemv_q8);
HWY_EXPORT(dequantize_q8);
HWY_EXPORT(quantize_x_q8);

void gemv_q8_0_rows(const void* W, int64_t n0, int64_t n1, int64_t K, const int16_t* xq, const float* xd, int64_t M,
                    float* y, int64_t ldy) {
  HWY_DYNAMIC_DISPATCH(gemv_q8)(W, n0, n1, K, xq, xd, M, y, ldy);
}
void quantize_x_q8_0(const float* x, int64_t n, int16_t* q, float* d) {
  HWY_DYNAMIC_DISPATCH(quantize_x_q8)(x, n, q, d);
}
void dequantize_q8_0_simd(const void* in, int64_t n, float* out) { HWY_DYNAMIC_DISPATCH(dequantize_q8)(in, n, out); }

void gemv_rows(const void* W, DType wdt, int64_t n0, int64_t n1, int64_t K, const float* x, int64_t M, float* y,
               int64_t ldy) {
  HWY_DYNAMIC_DISPATCH(gemv)(W, wdt, n0, n1, K, x, M, y, ldy);
}
void widen_bf16_row(const uint16_t* w, int64_t count, float* out) { HWY_DYNAMIC_DISPATCH(widen_bf16)(w, count, out); }
void rms_norm_simd(float* x, int64_t n, const void* w, DType wdt, float eps) {
  HWY_DYNAMIC_DISPATCH(rms_norm_row)(x, n, w, wdt, eps);
}
void rope_rotate_simd(float* v, int64_t half, const float* c, const float* s) {
  HWY_DYNAMIC_DISPATCH(rope_rotate)(v, half, c, s);
}
void silu_mul_simd(float* gate, const float* up, int64_t n) { HWY_DYNAMIC_DISPATCH(silu_mul)(gate, up, n); }
DotRowFn dot_row_kernel() { return HWY_DYNAMIC_DISPATCH(dot_row); }
}  // namespace ksa::cpu::detail
#endif
