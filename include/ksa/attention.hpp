// Parameters of the KSA attention ops (one struct per op, docs/design.md: parameters), shared by the CPU and CUDA
// backends. Tensors are [B, L, H, D] views of the stream in stream order, innermost dim contiguous, with
// strides in elements so that slices of larger buffers (e.g. a fused qkv projection) work unchanged.
#pragma once
#include <cmath>
#include <cstdint>

#include "ksa/dtype.hpp"
#include "ksa/spec.hpp"

namespace ksa {

struct TensorView {
  void* data = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;  // elements; the D elements are contiguous

  // A dense [B, L, H, D] tensor.
  static TensorView dense(const void* p, int64_t L, int64_t H, int64_t D) {
    return TensorView{const_cast<void*>(p), L * H * D, H * D, D};
  }
  KSA_HD int64_t offset(int64_t b, int64_t row, int64_t h) const {
    return b * batch_stride + row * row_stride + h * head_stride;
  }
};

// One stream of a call: its Layout and its first row in the tensors (see AttentionParams::sequence).
struct SequenceRows {
  Layout layout;
  int64_t row0 = 0;
};

// Forward: q [B, L, Hq, D], k and v [B, L, Hkv, D] -> out [B, L, Hq, D] (same dtype) and lse [B, L, Hq]
// (fp32, natural log, of the scaled scores). Query head h uses KV head h / (Hq / Hkv).
//
// Packed sequences (FlashAttention's "varlen" form): with cu_seqlens set, B is 1 and the L rows hold num_seqs
// independent streams back to back. Stream s is rows [cu_seqlens[s], cu_seqlens[s+1]) with its own
// Layout(layout.chunk_size, layout.S, T_s, layout.summarize_tail), T_s = text_length_of_stream(its length) (so every
// length must be a valid stream length); nothing is seen across a boundary, and each stream has its own chunk
// grid. layout.T is ignored. lse stays [1, L, Hq] over all rows. The CPU kernels, the oracle and the CUDA
// kernels walk each stream with the core's tiles, all streams in one call (CUDA: one launch per kernel, its
// grid over a table of (stream, tile) work items; src/cuda/varlen_plan.hpp).
struct AttentionParams {
  Layout layout;  // stream geometry: k, S, T (text tokens), summarize_tail
  int64_t W = 0;  // this layer's window, in chunks
  int64_t B = 1, Hq = 1, Hkv = 1, D = 0;
  float scale = 0.f;  // softmax scale; 0 means 1/sqrt(D)
  DType dtype = DType::f32;
  TensorView q{}, k{}, v{}, out{};      // `{}`: a designated initializer may leave them out (shaped_params)
  float* lse = nullptr;                 // [B, L, Hq] dense; may be null when not needed
  int num_threads = 0;                  // CPU: 0 = all available
  const int64_t* cu_seqlens = nullptr;  // packed sequences: [num_seqs + 1] host memory, or null (one stream)
  int64_t num_seqs = 0;
  // Queries from stream row q_begin on (a prompt continued in pieces, a context-parallel shard): only rows
  // [q_begin, L) of q (and, backward, of out, dout, lse) are read and of out/lse (dq) written, so views may
  // start q_begin rows before their memory; every row of k and v that those rows see must hold its key, and
  // dk/dv get every row. One stream only (not packed). CPU: forward and backward; CUDA: forward only
  // (cuda::supports says no for a backward with q_begin != 0).
  int64_t q_begin = 0;

  bool packed() const { return cu_seqlens != nullptr; }
  int64_t L() const { return packed() ? cu_seqlens[num_seqs] : layout.length(); }  // rows per batch entry
  int64_t sequences() const { return packed() ? num_seqs : 1; }
  // Stream s (0 <= s < sequences()); for valid params (validate).
  SequenceRows sequence(int64_t s) const {
    if (!packed()) return SequenceRows{layout, 0};
    const int64_t r0 = cu_seqlens[s], n = cu_seqlens[s + 1] - r0;
    return SequenceRows{
        Layout(layout.chunk_size, layout.S,
               text_length_of_stream(layout.chunk_size, layout.S, n, layout.summarize_tail), layout.summarize_tail),
        r0};
  }
  float softmax_scale() const { return scale != 0.f ? scale : 1.f / std::sqrt(float(D)); }
  int64_t group() const { return Hq / Hkv; }
};

// Backward: from q, k, v, out, lse (of the forward) and dout -> dq, dk, dv (same shapes and dtype).
struct AttentionBackwardParams : AttentionParams {
  TensorView dout, dq, dk, dv;
  bool deterministic = false;  // GPU: same bits every run (no floating-point atomics); see cuda::attention_backward
};

// Params (P: AttentionParams or AttentionBackwardParams) of one geometry and dtype; the views are left empty.
template <class P = AttentionParams>
P shaped_params(const Layout& lay, int64_t W, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, DType dtype) {
  P p;
  static_cast<AttentionParams&>(p) = {.layout = lay, .W = W, .B = B, .Hq = Hq, .Hkv = Hkv, .D = D, .dtype = dtype};
  return p;
}

// Dense [B, L, H, D] buffers (q, out, dout, dq with Hq heads; k, v, dk, dv with Hkv; lse [B, L, Hq]); the
// backward ones may stay null for a forward.
struct DenseBuffers {
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const void* dout = nullptr;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
};
inline AttentionBackwardParams dense_params(const Layout& lay, int64_t W, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                                            DType dtype, const DenseBuffers& buf) {
  auto p = shaped_params<AttentionBackwardParams>(lay, W, B, Hq, Hkv, D, dtype);
  const int64_t L = lay.length();
  p.q = TensorView::dense(buf.q, L, Hq, D);
  p.k = TensorView::dense(buf.k, L, Hkv, D);
  p.v = TensorView::dense(buf.v, L, Hkv, D);
  p.out = TensorView::dense(buf.out, L, Hq, D);
  p.lse = buf.lse;
  p.dout = TensorView::dense(buf.dout, L, Hq, D);
  p.dq = TensorView::dense(buf.dq, L, Hq, D);
  p.dk = TensorView::dense(buf.dk, L, Hkv, D);
  p.dv = TensorView::dense(buf.dv, L, Hkv, D);
  return p;
}

// Throw ksa::Error naming the bad field and value (e.g. "Hq: must be a multiple of Hkv=3 (got 8)").
void validate(const AttentionParams& p);
void validate(const AttentionBackwardParams& p);

// Stream s of packed params as plain single-stream params: the views (and lse) start at the stream's first
// row, cu_seqlens is null. For backends that run packed params one stream at a time.
AttentionParams sequence_params(const AttentionParams& p, int64_t s);
AttentionBackwardParams sequence_params(const AttentionBackwardParams& p, int64_t s);

}  // namespace ksa
