// Internal, per Highway target (included after hwy/highway.h by the *_hwy.cpp kernels, once per target):
// vector helpers shared by the kernels.
#if defined(KSA_CPU_SIMD_INL_HPP_) == defined(HWY_TARGET_TOGGLE)
#ifdef KSA_CPU_SIMD_INL_HPP_
#undef KSA_CPU_SIMD_INL_HPP_
#else
#define KSA_CPU_SIMD_INL_HPP_
#endif

#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace ksa::cpu::detail {
namespace HWY_NAMESPACE {

// exp(x) per lane: 2^n * e^r with n = round(x / ln 2), |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
// (truncation < 1e-8 relative, about one ulp overall); 2^n built in the exponent bits. x < -87 (including
// -inf) gives 0, x > 88 is taken as 88.
template <class D, class V>
HWY_INLINE V simd_exp(D d, V x) {
  namespace hn = hwy::HWY_NAMESPACE;
  const hn::RebindToSigned<D> di;
  const auto tiny = hn::Lt(x, hn::Set(d, -87.f));
  x = hn::Min(hn::Max(x, hn::Set(d, -87.f)), hn::Set(d, 88.f));
  const V n = hn::Round(hn::Mul(x, hn::Set(d, 1.44269504088896341f)));
  V r = hn::NegMulAdd(n, hn::Set(d, 0.693359375f), x);
  r = hn::NegMulAdd(n, hn::Set(d, -2.12194440e-4f), r);
  V p = hn::Set(d, 1.f / 5040.f);
  p = hn::MulAdd(p, r, hn::Set(d, 1.f / 720.f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.f / 120.f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.f / 24.f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.f / 6.f));
  p = hn::MulAdd(p, r, hn::Set(d, 0.5f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.f));
  const V two_n = hn::BitCast(d, hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127))));
  return hn::IfThenZeroElse(tiny, hn::Mul(p, two_n));
}

}  // namespace HWY_NAMESPACE
}  // namespace ksa::cpu::detail
HWY_AFTER_NAMESPACE();

#endif  // include guard toggle
