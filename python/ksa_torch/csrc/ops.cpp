// PyTorch binding of the ksa kernels: a thin layer that checks tensors, builds the Params and calls the
// CUDA or CPU kernel. Built by python/setup.py (torch's BuildExtension) against the static libraries of the
// CMake build; imported as ksa_torch._C.
//
// Two registered operators (TORCH_LIBRARY, so torch.ops.ksa.* on every torch version, and opaque nodes for
// torch.compile once ksa_torch/_ops.py registers their fake implementations and autograd formula):
//   ksa::attention_fwd(q, k, v, cu_seqlens?, max_seqlen, chunk_size, S, W, summarize_tail, scale, deterministic,
//       q_begin=0) -> (out, lse)
//   ksa::attention_bwd(dout, q, k, v, out, lse, cu_seqlens?, max_seqlen, chunk_size, S, W, summarize_tail, scale,
//       deterministic, q_begin=0) -> (dq, dk, dv)
// q [B, L, Hq, D] or [L, Hq, D]; k, v with Hkv heads; out like q (dense), lse q's shape without D (fp32).
// q_begin (one stream, not packed): q (and out, lse, dout, dq) hold only the stream rows [q_begin, L) of the
// L rows of k and v: the queries from q_begin on against every key (a context-parallel shard's keys with its
// halo before them). The CPU kernels compute only those rows; the CUDA backward, which takes every row, gets
// them padded with zero rows (see attention_bwd).
// cu_seqlens (int32/int64, [n + 1], any device): packed streams over the L rows of a B = 1 (or 3-dim) input.
// float64 CPU tensors run the oracle (for gradcheck). `deterministic` is read by the backward only (it is a
// forward argument so that the registered autograd formula sees it).
// Plus plain functions (pybind): the stream layout helpers, the rule as a mask, the pair counter, __version__.
// ATen, the operator registry and torch's pybind11 casters only (torch/extension.h would add the whole C++
// frontend and double the compile time).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "ksa/cpu.hpp"
#include "ksa/error.hpp"
#include "ksa/spec.hpp"
#ifdef KSA_HAVE_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ksa/cuda.hpp"
#include "ksa/cuda_env.hpp"  // KSA_CUDA_FWD_CONFIG, KSA_CUDA_BWD_*: kernel variants for comparisons
#endif

// setup.py passes the version (CMakeLists.txt's project VERSION) as a bare pp-number.
#define KSA_STRINGIFY2(x) #x
#define KSA_STRINGIFY(x) KSA_STRINGIFY2(x)
#ifdef KSA_VERSION_RAW
#define KSA_VERSION KSA_STRINGIFY(KSA_VERSION_RAW)
#else
#define KSA_VERSION "0+unknown"
#endif

namespace {

using OptTensor = c10::optional<at::Tensor>;

ksa::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ksa::DType::f32;
    case at::kBFloat16:
      return ksa::DType::bf16;
    case at::kHalf:
      return ksa::DType::f16;
    default:
      break;
  }
  TORCH_CHECK(false, "ksa: dtype must be float32, bfloat16 or float16, or float64 on the CPU (got ", t.scalar_type(),
              ")");
  return ksa::DType::f32;  // not reached
}

// [L, H, D] tensors are taken as [1, L, H, D].
at::Tensor as4(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(0) : t; }

// first_row: the tensor holds the stream rows from first_row on (q_begin), so the view, which a stream
// position indexes, starts first_row rows before its memory; the kernels never touch those rows.
ksa::TensorView view_of(const at::Tensor& t, const char* name, int64_t first_row = 0) {
  TORCH_CHECK(t.dim() == 4, "ksa: ", name, " must be [B, L, H, D] or [L, H, D] (got ", t.dim(), " dims)");
  TORCH_CHECK(t.stride(3) == 1, "ksa: ", name, " must be contiguous in its last dim");
  char* data = static_cast<char*>(t.data_ptr()) - first_row * t.stride(1) * int64_t(t.element_size());
  return ksa::TensorView{data, t.stride(0), t.stride(1), t.stride(2)};
}

// t [B, n, H, D] (or [n, H, D]) with `rows` zero rows put before its n rows.
at::Tensor pad_front(const at::Tensor& t, int64_t rows) {
  if (rows == 0) return t;
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[shape.size() - 3] = rows;
  return at::cat({at::zeros(shape, t.options()), t}, t.dim() - 3);
}

// Packed sequence boundaries as host int64 (a copy: the kernels' params take them in host memory, where the
// CPU kernels read them and the CUDA launchers build their per-launch tables; a CUDA cu_seqlens costs one
// device-to-host copy).
std::vector<int64_t> host_cu_seqlens(const at::Tensor& cu, int64_t rows, int64_t max_seqlen) {
  TORCH_CHECK(cu.dim() == 1 && cu.numel() >= 2, "ksa: cu_seqlens must be 1-D with at least 2 entries (got shape ",
              cu.sizes(), ")");
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong,
              "ksa: cu_seqlens must be int32 or int64 (got ", cu.scalar_type(), ")");
  const at::Tensor h = cu.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> v(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel());
  TORCH_CHECK(v.back() == rows, "ksa: cu_seqlens[-1] = ", v.back(), " must equal the number of rows L = ", rows);
  if (max_seqlen > 0) {
    int64_t longest = 0;
    for (size_t i = 1; i < v.size(); ++i) longest = std::max(longest, v[i] - v[i - 1]);
    TORCH_CHECK(longest <= max_seqlen, "ksa: max_seqlen = ", max_seqlen, " but a stream of cu_seqlens has ", longest,
                " rows");
  }
  return v;
}

ksa::AttentionParams params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t chunk_size,
                            int64_t S, int64_t W, bool tail, double scale, const std::vector<int64_t>* cu,
                            int64_t q_begin = 0) {
  TORCH_CHECK(q.dim() == k.dim() && q.dim() == v.dim(), "ksa: q, k, v must have the same number of dims");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "ksa: q, k, v must be on one device");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "ksa: q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes(), "ksa: k and v must have the same shape");
  const at::Tensor q4 = as4(q), k4 = as4(k), v4 = as4(v);
  const int64_t L = k4.size(1);
  TORCH_CHECK(q_begin >= 0 && q_begin <= L, "ksa: q_begin must be in [0, L = ", L, "] (got ", q_begin, ")");
  TORCH_CHECK(q_begin == 0 || !cu, "ksa: q_begin must be 0 with cu_seqlens (got ", q_begin, ")");
  TORCH_CHECK(q4.size(0) == k4.size(0) && q4.size(1) == L - q_begin && q4.size(3) == k4.size(3),
              "ksa: q [B, L - q_begin, Hq, D] and k [B, L, Hkv, D] disagree (", q.sizes(), " vs ", k.sizes(),
              ", q_begin ", q_begin, ")");
  TORCH_CHECK(chunk_size >= 1 && S >= 1, "ksa: chunk_size and S must be >= 1 (got ", chunk_size, ", ", S, ")");
  ksa::AttentionParams p;
  if (cu) {
    TORCH_CHECK(q4.size(0) == 1, "ksa: with cu_seqlens, q must be [L, H, D] or [1, L, H, D] (got ", q.sizes(), ")");
    p.layout = ksa::Layout(chunk_size, S, 0, tail);
    p.cu_seqlens = cu->data();
    p.num_seqs = int64_t(cu->size()) - 1;
  } else {
    const int64_t T = ksa::text_length_of_stream(chunk_size, S, L, tail);
    TORCH_CHECK(T >= 0, "ksa: stream length ", L, " is not a valid KSA stream for chunk_size=", chunk_size, ", S=", S,
                ", summarize_tail=", tail);
    p.layout = ksa::Layout(chunk_size, S, T, tail);
  }
  p.W = W;
  p.B = q4.size(0);
  p.Hq = q4.size(2);
  p.Hkv = k4.size(2);
  p.D = q4.size(3);
  p.scale = float(scale);
  p.dtype = q.scalar_type() == at::kDouble ? ksa::DType::f32 : dtype_of(q);
  p.q = view_of(q4, "q", q_begin);
  p.k = view_of(k4, "k");
  p.v = view_of(v4, "v");
  p.q_begin = q_begin;
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

at::Tensor lse_like(const at::Tensor& q) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end() - 1);
  return at::empty(shape, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

// The oracle (plain loops, double accumulation) for float64 CPU tensors. It reads float32, so q, k, v (and
// dout) are converted: exact when their values are float32-representable (see tests/test_autograd.py).
std::vector<at::Tensor> as_f32(std::initializer_list<at::Tensor> ts) {
  std::vector<at::Tensor> o;
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.device().is_cpu(), "ksa: the float64 (oracle) path runs on the CPU only");
    o.push_back(as4(t).to(at::kFloat).contiguous());
  }
  return o;
}

void copy_doubles(const std::vector<double>& src, at::Tensor& dst) {
  std::copy(src.begin(), src.end(), dst.data_ptr<double>());
}

// The kernels index lse by stream row ([B, L, Hq]); with q_begin the caller's lse has only the rows from
// q_begin on, so the kernels get a full-length buffer and the caller its rows.
at::Tensor full_lse(const at::Tensor& q, int64_t q_begin) {
  const at::Tensor rows = lse_like(q);
  if (q_begin == 0) return rows;
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape[shape.size() - 2] += q_begin;                // [B, L, Hq] or [L, Hq]
  return at::full(shape, INFINITY, rows.options());  // rows before q_begin: never written, +inf if read
}
at::Tensor lse_rows(const at::Tensor& lse_full, int64_t q_begin) {
  return q_begin == 0 ? lse_full
                      : lse_full.narrow(lse_full.dim() - 2, q_begin, lse_full.size(-2) - q_begin).contiguous();
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const OptTensor& cu_seqlens, int64_t max_seqlen, int64_t chunk_size,
                                                 int64_t S, int64_t W, bool tail, double scale, bool deterministic,
                                                 int64_t q_begin) {
  if (q_begin != 0 && q.scalar_type() == at::kDouble) {
    // The oracle computes every row: pad q in front, keep the rows from q_begin on.
    auto [o, l] = attention_fwd(pad_front(q, q_begin), k, v, cu_seqlens, max_seqlen, chunk_size, S, W, tail, scale,
                                deterministic, 0);
    return {o.narrow(o.dim() - 3, q_begin, q.size(-3)).contiguous(), lse_rows(l, q_begin)};
  }
  const std::vector<int64_t> cu =
      cu_seqlens ? host_cu_seqlens(*cu_seqlens, k.size(-3), max_seqlen) : std::vector<int64_t>{};
  ksa::AttentionParams p = params(q, k, v, chunk_size, S, W, tail, scale, cu_seqlens ? &cu : nullptr, q_begin);
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = full_lse(q, q_begin);
  if (q.scalar_type() == at::kDouble) {
    const std::vector<at::Tensor> f = as_f32({q, k, v});
    p.q = view_of(f[0], "q"), p.k = view_of(f[1], "k"), p.v = view_of(f[2], "v");
    p.out = p.q;  // validated, never read or written by the oracle
    const ksa::cpu::ReferenceOutput r = guarded([&] { return ksa::cpu::attention_reference(p); });
    copy_doubles(r.out, out);
    copy_doubles(r.lse, lse);
    return {out, lse};
  }
  p.out = view_of(as4(out), "out", q_begin);
  p.lse = lse.data_ptr<float>();
  guarded([&] {
    if (q.is_cuda()) {
#ifdef KSA_HAVE_CUDA
      const c10::cuda::CUDAGuard guard(q.device());
      const ksa::cuda::CudaStream stream = at::cuda::getCurrentCUDAStream().stream();
      ksa::cuda::attention_forward(
          p, stream, ksa::cuda::kernel_options_from_env());  // packed streams too: one launch for all of them
#else
      TORCH_CHECK(false, "ksa: this build of ksa_torch has no CUDA kernels (rebuild with a CUDA torch and nvcc)");
#endif
    } else {
      ksa::cpu::attention_forward(p);
    }
    return 0;
  });
  return {out, lse_rows(lse, q_begin)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout_in, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const OptTensor& cu_seqlens, int64_t max_seqlen,
                                                             int64_t chunk_size, int64_t S, int64_t W, bool tail,
                                                             double scale, bool deterministic, int64_t q_begin) {
  if (q_begin != 0 && (q.is_cuda() || q.scalar_type() == at::kDouble)) {
    // The CUDA backward and the oracle take every row: zero rows in front (q, dout and out zero, lse +inf, so
    // they add nothing to dk and dv), dq from q_begin on. Costs the padded rows' work and memory.
    TORCH_CHECK(q_begin > 0 && q_begin <= k.size(-3), "ksa: q_begin must be in [0, L = ", k.size(-3), "] (got ",
                q_begin, ")");
    at::Tensor lse_full = full_lse(q, q_begin);
    lse_full.narrow(lse_full.dim() - 2, q_begin, q.size(-3)).copy_(lse);
    auto [dq, dk, dv] =
        attention_bwd(pad_front(dout_in, q_begin), pad_front(q, q_begin), k, v, pad_front(out, q_begin), lse_full,
                      cu_seqlens, max_seqlen, chunk_size, S, W, tail, scale, deterministic, 0);
    return {dq.narrow(dq.dim() - 3, q_begin, q.size(-3)).contiguous(), dk, dv};
  }
  const std::vector<int64_t> cu =
      cu_seqlens ? host_cu_seqlens(*cu_seqlens, k.size(-3), max_seqlen) : std::vector<int64_t>{};
  ksa::AttentionBackwardParams p;
  static_cast<ksa::AttentionParams&>(p) =
      params(q, k, v, chunk_size, S, W, tail, scale, cu_seqlens ? &cu : nullptr, q_begin);
  // The kernels need the innermost dim contiguous and (CUDA) 16-byte aligned rows: a dense copy is the safe
  // form of an arbitrary incoming gradient (e.g. an expanded one with zero strides).
  const at::Tensor dout = dout_in.contiguous();
  for (const at::Tensor* t : {&out, &dout}) {
    TORCH_CHECK(t->sizes() == q.sizes(), "ksa: out and dout must have q's shape ", q.sizes(), " (got ", t->sizes(),
                ")");
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "ksa: out and dout must match q's dtype and device");
  }
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (q.scalar_type() == at::kDouble) {
    const std::vector<at::Tensor> f = as_f32({q, k, v, dout});
    p.q = view_of(f[0], "q"), p.k = view_of(f[1], "k"), p.v = view_of(f[2], "v");
    p.out = p.q;  // validated, never read by the oracle (it recomputes the forward)
    p.dout = view_of(f[3], "dout");
    const ksa::cpu::ReferenceGrads g = guarded([&] { return ksa::cpu::attention_reference_backward(p); });
    copy_doubles(g.dq, dq);
    copy_doubles(g.dk, dk);
    copy_doubles(g.dv, dv);
    return {dq, dk, dv};
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
                  lse.sizes() == q.sizes().slice(0, q.dim() - 1),
              "ksa: lse must be the forward's contiguous float32 tensor of shape q.shape[:-1]");
  at::Tensor lse_full = lse;
  if (q_begin != 0) {  // the kernels index lse by stream row (see full_lse)
    lse_full = full_lse(q, q_begin);
    lse_full.narrow(lse_full.dim() - 2, q_begin, q.size(-3)).copy_(lse);
  }
  p.out = view_of(as4(out), "out", q_begin);
  p.dout = view_of(as4(dout), "dout", q_begin);
  p.lse = lse_full.data_ptr<float>();
  p.dq = view_of(as4(dq), "dq", q_begin);
  p.dk = view_of(as4(dk), "dk");
  p.dv = view_of(as4(dv), "dv");
  p.deterministic = deterministic;
  guarded([&] {
    if (q.is_cuda()) {
#ifdef KSA_HAVE_CUDA
      const c10::cuda::CUDAGuard guard(q.device());
      const ksa::cuda::CudaStream stream = at::cuda::getCurrentCUDAStream().stream();
      ksa::cuda::attention_backward(
          p, stream,
          ksa::cuda::kernel_options_from_env());  // packed streams too: one launch of each pass for all of them
#else
      TORCH_CHECK(false, "ksa: this build of ksa_torch has no CUDA kernels (rebuild with a CUDA torch and nvcc)");
#endif
    } else {
      ksa::cpu::attention_backward(p);
    }
    return 0;
  });
  return {dq, dk, dv};
}

// --- Stream layout helpers (the engine's rule: ksa::build_stream, Layout, rope_position) -------------------

// The streams of texts of the given lengths, packed back to back: a dict of int64 CPU tensors
//   cu_seqlens [n + 1] (stream rows), text_rows [sum T] (the stream row of every text token, in text order),
//   position_ids [L] (RoPE positions, docs/ksa.md: Positions), is_summary [L] (bool), input_ids [L] (when text_ids
//   given: text ids in place, summary ids begin + j), max_seqlen (int).
py::dict stream_layout(const std::vector<int64_t>& text_lengths, int64_t chunk_size, int64_t S, bool tail,
                       const std::string& text_positions, const std::string& summary_positions,
                       int64_t summary_token_begin, const OptTensor& text_ids) {
  ksa::Spec spec;
  spec.chunk_size = chunk_size;
  spec.S = S;
  spec.summarize_tail = tail;
  spec.summary_token_begin = summary_token_begin;
  std::vector<int64_t> cu{0};
  int64_t T_total = 0;
  guarded([&] {
    spec.text_positions = ksa::parse_text_positions(text_positions, "text_positions");
    spec.summary_positions = ksa::parse_summary_positions(summary_positions, "summary_positions");
    spec.validate();
    for (int64_t T : text_lengths) {
      if (T < 0) ksa::fail("text_lengths: must be >= 0 (got ", T, ")");
      cu.push_back(cu.back() + ksa::Layout::of(spec, T).length());
      T_total += T;
    }
    return 0;
  });
  at::Tensor ids_in;
  if (text_ids) {
    TORCH_CHECK(text_ids->dim() == 1 && text_ids->numel() == T_total,
                "ksa: text_ids must be 1-D with sum(text_lengths) = ", T_total, " entries (got shape ",
                text_ids->sizes(), ")");
    ids_in = text_ids->to(at::kCPU, at::kInt).contiguous();
  }
  const int64_t L = cu.back();
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor cu_t = at::empty({int64_t(cu.size())}, i64), text_rows = at::empty({T_total}, i64);
  at::Tensor pos = at::empty({L}, i64), summ = at::empty({L}, at::TensorOptions().dtype(at::kBool));
  at::Tensor ids = at::empty({text_ids ? L : 0}, i64);
  std::copy(cu.begin(), cu.end(), cu_t.data_ptr<int64_t>());
  int64_t t0 = 0, longest = 0;
  std::vector<int32_t> none;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    const int64_t T = text_lengths[s], r0 = cu[s];
    if (!text_ids) none.assign(size_t(T), 0);
    const std::span<const int32_t> seq_ids = text_ids
                                                 ? std::span<const int32_t>(ids_in.data_ptr<int32_t>() + t0, size_t(T))
                                                 : std::span<const int32_t>(none);
    const ksa::Stream st = guarded([&] { return ksa::build_stream(spec, seq_ids); });
    const int64_t n = st.layout.length();
    longest = std::max(longest, n);
    for (int64_t i = 0; i < n; ++i) {
      pos.data_ptr<int64_t>()[r0 + i] = st.positions[size_t(i)];
      summ.data_ptr<bool>()[r0 + i] = st.is_summary[size_t(i)] != 0;
      if (text_ids) ids.data_ptr<int64_t>()[r0 + i] = st.ids[size_t(i)];
    }
    for (int64_t t = 0; t < T; ++t) text_rows.data_ptr<int64_t>()[t0 + t] = r0 + st.layout.text_to_stream(t);
    t0 += T;
  }
  py::dict d;
  d["cu_seqlens"] = cu_t;
  d["text_rows"] = text_rows;
  d["position_ids"] = pos;
  d["is_summary"] = summ;
  d["max_seqlen"] = longest;
  if (text_ids) d["input_ids"] = ids;
  return d;
}

// The rule itself (core `visible`) as a dense [L, L] bool matrix over stream positions, for tests that build
// masks for other attention implementations from the one definition.
at::Tensor visible_mask(int64_t chunk_size, int64_t S, int64_t T, int64_t W, bool tail) {
  const ksa::Layout lay(chunk_size, S, T, tail);
  const int64_t L = lay.length();
  at::Tensor m = at::empty({L, L}, at::TensorOptions().dtype(at::kBool));
  bool* d = m.data_ptr<bool>();
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j < L; ++j) d[i * L + j] = ksa::visible(lay, W, i, j);
  return m;
}

int64_t count_visible_pairs(int64_t chunk_size, int64_t S, int64_t T, int64_t W, bool tail) {
  return ksa::count_visible_pairs(ksa::Layout(chunk_size, S, T, tail), W);
}

int64_t text_length_of_stream(int64_t chunk_size, int64_t S, int64_t L, bool tail) {
  return ksa::text_length_of_stream(chunk_size, S, L, tail);
}

}  // namespace

#define KSA_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

TORCH_LIBRARY(ksa, m) {
#if KSA_TORCH_AT_LEAST(2, 4)
  // The fake implementations live in Python (ksa_torch/_ops.py registers them with torch.library.register_fake,
  // which requires this pointer for ops defined in C++); torch imports that module if it needs them first.
  m.set_python_module("ksa_torch._ops");
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
#else
  const std::vector<at::Tag> tags{};
#endif
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, int max_seqlen, int chunk_size, int S, int W, "
      "bool summarize_tail, float scale, bool deterministic, int q_begin=0) -> (Tensor, Tensor)",
      tags);
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens, "
      "int max_seqlen, int chunk_size, int S, int W, bool summarize_tail, float scale, bool deterministic, "
      "int q_begin=0) -> (Tensor, Tensor, Tensor)",
      tags);
}

TORCH_LIBRARY_IMPL(ksa, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

#ifdef KSA_HAVE_CUDA
TORCH_LIBRARY_IMPL(ksa, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ksa: Kwai Summary Attention kernels (the operators are torch.ops.ksa.attention_fwd / attention_bwd)";
  m.attr("__version__") = KSA_VERSION;
#ifdef KSA_HAVE_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.def("stream_layout", &stream_layout,
        "packed streams of texts: (text_lengths, chunk_size, S, summarize_tail, text_positions, summary_positions, "
        "summary_token_begin, text_ids or None) -> dict");
  m.def("visible_mask", &visible_mask, "the rule as a dense [L, L] bool matrix: (chunk_size, S, T, W, summarize_tail)");
  m.def("count_visible_pairs", &count_visible_pairs, "visible (query, key) pairs per head (core counter)");
  m.def("text_length_of_stream", &text_length_of_stream,
        "the text length of a stream of L rows: (chunk_size, S, L, summarize_tail) -> T, or -1 when no T gives L");
}
