// PyTorch binding of the ksa kernels: a thin layer that checks tensors, builds the Params and calls the
// CUDA or CPU kernel. Built by python/ksa_torch/__init__.py (torch cpp_extension) against the CMake build.
#include <torch/extension.h>

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

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kc, int64_t S,
                                int64_t W, bool tail, double scale) {
  ksa::AttentionParams p = params(q, k, v, kc, S, W, tail, scale);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = view_of(out, "out");
  p.lse = lse.data_ptr<float>();
  try {
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
  } catch (const ksa::Error& e) {
    TORCH_CHECK(false, "ksa: ", e.what());
  }
  return {out, lse};
}

int64_t count_visible_pairs(int64_t kc, int64_t S, int64_t T, int64_t W, bool tail) {
  return ksa::count_visible_pairs(ksa::Layout(kc, S, T, tail), W);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ksa: Kwai Summary Attention kernels";
  m.def("forward", &forward, "KSA attention forward: (q, k, v, k_chunk, S, W, summarize_tail, scale) -> (out, lse)");
  m.def("count_visible_pairs", &count_visible_pairs, "visible (query, key) pairs per head (core counter)");
}
