// PyTorch binding of the ksa kernels: a thin layer that checks tensors, builds the Params and calls the
// CUDA or CPU kernel. Built by python/ksa_torch/__init__.py (torch cpp_extension) against the CMake build.
#include <torch/extension.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "ksa/cpu.hpp"
#include "ksa/error.hpp"
#include "ksa/spec.hpp"
#ifdef KSA_HAVE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ksa/cuda.hpp"
#endif

namespace {

ksa::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ksa::DType::f32;
    case at::kBFloat16: return ksa::DType::bf16;
    case at::kHalf: return ksa::DType::f16;
    default: TORCH_CHECK(false, "ksa: dtype must be float32, bfloat16 or float16 (got ", t.scalar_type(), ")");
  }
}

ksa::TensorView view_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "ksa: ", name, " must be [B, L, H, D] (got ", t.dim(), " dims)");
  TORCH_CHECK(t.stride(3) == 1, "ksa: ", name, " must be contiguous in its last dim");
  return ksa::TensorView{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Text length T of a stream of length L (the inverse of Layout::length), or an error.
int64_t text_len(int64_t L, int64_t k, int64_t S, bool tail) {
  TORCH_CHECK(k >= 1 && S >= 1, "ksa: k_chunk and S must be >= 1");
  const int64_t c = L / (k + S), r = L % (k + S);
  // Without tail summaries the remainder is the partial chunk's text; with them it is text + S summaries.
  const int64_t T = (!tail || r == 0) ? c * k + r : c * k + r - S;
  TORCH_CHECK(T >= 0 && ksa::Layout(k, S, T, tail).length() == L, "ksa: stream length ", L,
              " is not a valid KSA stream for k=", k, ", S=", S, ", summarize_tail=", tail);
  return T;
}

ksa::AttentionParams params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kc, int64_t S,
                            int64_t W, bool tail, double scale) {
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "ksa: q, k, v must be on one device");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "ksa: q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "ksa: k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3), "ksa: q [B, L, Hq, D] and k [B, L, Hkv, D] disagree");
  ksa::AttentionParams p;
  p.layout = ksa::Layout(kc, S, text_len(q.size(1), kc, S, tail), tail);
  p.W = W;
  p.B = q.size(0);
  p.Hq = q.size(2);
  p.Hkv = k.size(2);
  p.D = q.size(3);
  p.scale = float(scale);
  p.dtype = dtype_of(q);
  p.q = view_of(q, "q");
  p.k = view_of(k, "k");
  p.v = view_of(v, "v");
  return p;
}

// Runs f, turning ksa::Error into a Python RuntimeError with the library's message.
template <class F>
auto guarded(F&& f) {
  try {
    return f();
  } catch (const ksa::Error& e) {
    throw std::runtime_error(std::string("ksa: ") + e.what());
  }
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kc, int64_t S,
                                int64_t W, bool tail, double scale) {
  ksa::AttentionParams p = params(q, k, v, kc, S, W, tail, scale);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = view_of(out, "out");
  p.lse = lse.data_ptr<float>();
  guarded([&] {
    if (q.is_cuda()) {
#ifdef KSA_HAVE_CUDA
      const c10::cuda::CUDAGuard guard(q.device());
      ksa::cuda::attention_forward(p, at::cuda::getCurrentCUDAStream().stream());
#else
      TORCH_CHECK(false, "ksa: this build has no CUDA kernels");
#endif
    } else {
      ksa::cpu::attention_forward(p);
    }
    return 0;
  });
  return {out, lse};
}

// Gradients of forward: dq, dk, dv (dense, dtype of q) from the forward's out and lse and the gradient dout.
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& dout, int64_t kc, int64_t S, int64_t W,
                                 bool tail, double scale, bool deterministic) {
  ksa::AttentionBackwardParams p;
  static_cast<ksa::AttentionParams&>(p) = params(q, k, v, kc, S, W, tail, scale);
  for (const at::Tensor* t : {&out, &dout}) {
    TORCH_CHECK(t->sizes() == q.sizes(), "ksa: out and dout must have q's shape ", q.sizes(), " (got ", t->sizes(), ")");
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(), "ksa: out and dout must match q's dtype and device");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "ksa: lse must be the forward's contiguous float32 [B, L, Hq] tensor");
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  p.out = view_of(out, "out");
  p.dout = view_of(dout, "dout");
  p.lse = lse.data_ptr<float>();
  p.dq = view_of(dq, "dq");
  p.dk = view_of(dk, "dk");
  p.dv = view_of(dv, "dv");
  p.deterministic = deterministic;
  guarded([&] {
    if (q.is_cuda()) {
#ifdef KSA_HAVE_CUDA
      const c10::cuda::CUDAGuard guard(q.device());
      ksa::cuda::attention_backward(p, at::cuda::getCurrentCUDAStream().stream());
#else
      TORCH_CHECK(false, "ksa: this build has no CUDA kernels");
#endif
    } else {
      ksa::cpu::attention_backward(p);
    }
    return 0;
  });
  return {dq, dk, dv};
}

// The oracle (plain loops, double accumulation) for float64 tensors on the CPU. The oracle reads its inputs
// as float32, so q, k, v (and dout) are converted: exact when their values are float32-representable.
std::vector<at::Tensor> f32_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu(), "ksa: the float64 (oracle) path runs on the CPU only");
  return {q.to(at::kFloat).contiguous(), k.to(at::kFloat).contiguous(), v.to(at::kFloat).contiguous()};
}

at::Tensor double_tensor(std::vector<double>& data, at::IntArrayRef shape) {
  return at::from_blob(data.data(), shape, at::TensorOptions().dtype(at::kDouble)).clone();
}

std::vector<at::Tensor> reference_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kc,
                                          int64_t S, int64_t W, bool tail, double scale) {
  const std::vector<at::Tensor> f = f32_inputs(q, k, v);
  ksa::AttentionParams p = params(f[0], f[1], f[2], kc, S, W, tail, scale);
  p.out = p.q;  // validated, never read or written by the oracle
  ksa::cpu::ReferenceOutput r = guarded([&] { return ksa::cpu::attention_reference(p); });
  return {double_tensor(r.out, q.sizes()), double_tensor(r.lse, {q.size(0), q.size(1), q.size(2)})};
}

std::vector<at::Tensor> reference_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& dout, int64_t kc, int64_t S, int64_t W, bool tail,
                                           double scale) {
  const std::vector<at::Tensor> f = f32_inputs(q, k, v);
  TORCH_CHECK(dout.sizes() == q.sizes(), "ksa: dout must have q's shape");
  const at::Tensor df = dout.to(at::kFloat).contiguous();
  ksa::AttentionBackwardParams p;
  static_cast<ksa::AttentionParams&>(p) = params(f[0], f[1], f[2], kc, S, W, tail, scale);
  p.out = p.q;  // validated, never read by the oracle (it recomputes the forward)
  p.dout = view_of(df, "dout");
  ksa::cpu::ReferenceGrads g = guarded([&] { return ksa::cpu::attention_reference_backward(p); });
  return {double_tensor(g.dq, q.sizes()), double_tensor(g.dk, k.sizes()), double_tensor(g.dv, v.sizes())};
}

// The rule itself (core `visible`) as a dense [L, L] bool matrix over stream positions, for tests that build
// masks for other attention implementations from the one definition.
at::Tensor visible_mask(int64_t kc, int64_t S, int64_t T, int64_t W, bool tail) {
  const ksa::Layout lay(kc, S, T, tail);
  const int64_t L = lay.length();
  at::Tensor m = at::empty({L, L}, at::TensorOptions().dtype(at::kBool));
  bool* d = m.data_ptr<bool>();
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < L; ++j) d[i * L + j] = ksa::visible(lay, W, i, j);
  return m;
}

int64_t count_visible_pairs(int64_t kc, int64_t S, int64_t T, int64_t W, bool tail) {
  return ksa::count_visible_pairs(ksa::Layout(kc, S, T, tail), W);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ksa: Kwai Summary Attention kernels";
  m.def("forward", &forward, "KSA attention forward: (q, k, v, k_chunk, S, W, summarize_tail, scale) -> (out, lse)");
  m.def("backward", &backward,
        "KSA attention backward: (q, k, v, out, lse, dout, k_chunk, S, W, summarize_tail, scale, deterministic) -> (dq, dk, dv)");
  m.def("reference_forward", &reference_forward, "the oracle's forward for float64 CPU tensors -> (out, lse), float64");
  m.def("reference_backward", &reference_backward,
        "the oracle's analytic backward for float64 CPU tensors: (q, k, v, dout, ...) -> (dq, dk, dv), float64");
  m.def("visible_mask", &visible_mask, "the rule as a dense [L, L] bool matrix: (k_chunk, S, T, W, summarize_tail)");
  m.def("count_visible_pairs", &count_visible_pairs, "visible (query, key) pairs per head (core counter)");
}
