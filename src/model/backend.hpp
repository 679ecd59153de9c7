// The operations the Qwen3-KSA forward (model.cpp) is written in, and the two backends that supply them:
// the CPU (backend_cpu.cpp: ksa::cpu kernels over fp32 activations) and CUDA (backend_cuda.cpp: cuBLASLt
// matrix products, ksa::cuda kernels, bf16 activations). The model never calls ksa::cpu:: or ksa::cuda::
// directly; it owns the stream bookkeeping (which tokens, positions, summaries) and the layer structure, a
// backend owns memory, the KV caches and the arithmetic.
//
// A step: the model describes the step's stream rows once (begin_step: token ids, RoPE positions, which rows
// are summaries, the sequences and their row ranges); every op then works on activations of the step's rows
// [n, cols] and refers to those row sets implicitly. Activations live until the next begin_step.
//
// Precision: `x` (the residual stream) and the products added to it are fp32 (Prec::wide); inputs of matrix
// products and the q/k/v projections are Prec::narrow (fp32 on the CPU; bf16 on CUDA, as the reference's
// bf16 linears round them); q, k, v are rounded to the KV cache's dtype before attention, as the reference
// bf16 inference does.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ksa/cache.hpp"
#include "ksa/dtype.hpp"
#include "ksa/model.hpp"
#include "ksa/safetensors.hpp"
#include "ksa/sampler.hpp"

namespace ksa::engine {

// A weight placed on the backend's device (the CPU keeps the mmap'ed bytes; CUDA uploads them).
struct Weight {
  const void* data = nullptr;
  DType dtype = DType::bf16;
  int64_t rows = 0, cols = 0, nbytes = 0;  // [rows, cols] row-major (a vector: rows 1)
  std::shared_ptr<void> keep;              // owns the memory (aligned copy or device buffer)
  explicit operator bool() const { return data != nullptr; }
};

// wide: fp32; narrow: the backend's matrix-product input dtype; cache: the KV cache's dtype.
enum class Prec : uint8_t { wide, narrow, cache };

// Activations of the step's rows: [rows, cols], row-major, on the backend's device.
struct Act {
  void* data = nullptr;
  int64_t rows = 0, cols = 0;
  DType dtype = DType::f32;
};

// Rows [r0, r0 + n) of a, as an Act of n rows.
inline Act row_range(const Act& a, int64_t r0, int64_t n) {
  Act s = a;
  s.data = static_cast<char*>(a.data) + r0 * a.cols * dtype_size(a.dtype);
  s.rows = n;
  return s;
}

// Row subsets the ops take (fixed for a step by begin_step).
enum class Rows : uint8_t { summary, logits };

struct StepSeq {
  SeqId cache_id = -1;      // the sequence's id in every layer's cache (the same in all layers)
  int64_t row0 = 0, n = 0;  // its new stream rows [row0, row0 + n) of the step
  // Attend with the prefill kernel (a prompt, or a piece of one): over these rows and the `cached` stream
  // rows the cache holds before them (0: a fresh sequence). Otherwise: the decode kernel through the cache.
  bool fresh = false;
  int64_t cached = 0;
};

// Decoding sequences (fresh false) come first in `seqs`, their rows packed from row 0; prefill ones follow.
struct StepDesc {
  std::vector<int32_t> ids;           // [n] embedding row per stream row
  std::vector<int32_t> positions;     // [n] RoPE positions
  std::vector<int32_t> summary_rows;  // rows that are summary tokens, increasing
  std::vector<int32_t> logits_rows;   // rows whose logits are computed, increasing
  std::vector<StepSeq> seqs;
  int64_t rows() const { return int64_t(ids.size()); }
};

// One sampling request on a logits row (the row's index among StepDesc::logits_rows).
struct SampleReq {
  int64_t logits_row = 0;
  const SamplerConfig* cfg = nullptr;
  double u = 0;  // the draw's uniform in [0, 1)
  std::span<const int32_t> history;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;  // "cpu (N threads)", "cuda: NVIDIA H200 (sm_90, ...)"
  virtual DType dtype(Prec p) const = 0;  // what act(rows, cols, p) holds

  // Weights (called at load). `t` may be null (absent tensor): returns an empty Weight.
  virtual Weight place(const TensorInfo* t) = 0;
  // One KV cache per layer, created once at load; `cache(i)` is its bookkeeping (states, bytes, ids).
  virtual void create_caches(const std::vector<KvCacheConfig>& layers) = 0;
  virtual KvCache& cache(size_t layer) = 0;
  // Text tokens one continuation (not fresh) of a sequence holding T text tokens may add in one step
  // (beyond: the model splits the step).
  virtual int64_t max_continuation_tokens(int64_t T) const = 0;
  // Text tokens of one prefill piece (a longer prompt runs in pieces, each attending over the cache's rows
  // and its own: activations stay bounded by the piece, not the prompt).
  virtual int64_t max_prefill_tokens() const { return int64_t(1) << 62; }

  // Steps.
  virtual void begin_step(const StepDesc& step) = 0;
  // Scratch for this step: [rows, cols] of dtype(p), from take().
  Act act(int64_t rows, int64_t cols, Prec p) {
    const DType t = dtype(p);
    return Act{take(size_t(rows * cols * int64_t(dtype_size(t)))), rows, cols, t};
  }
  virtual void* take(size_t bytes) = 0;  // bytes of scratch that live until the next begin_step
  virtual void embed(const Weight& table, Act x) = 0;       // x[r] = table[ids[r]] (fp32)
  // out = RMSNorm(x) * w per row (summary rows with ws when given).
  virtual void rms_norm(const Act& x, const Weight& w, const Weight& ws, float eps, Act out) = 0;
  // y[M, N] = x[M, K] W^T (W [N, K]; N = y.cols, which may be fewer than W's rows).
  virtual void linear(const Act& x, const Weight& W, Act y) = 0;
  // y = [x W1^T | x W2^T | ...]: the products side by side in y's columns (y.cols = the sum of the weights'
  // rows). A backend may have placed the weights contiguously (fuse) and run one product.
  virtual void linear_cat(const Act& x, std::span<const Weight* const> ws, Act y) = 0;
  // Called once at load for weights that are always multiplied together (q/k/v, gate/up): a backend may
  // move them into one allocation, row after row, repointing each Weight into it.
  virtual void fuse(std::span<Weight* const> ws) { (void)ws; }
  // out[i] = in[rows[i]] / out[rows[i]] = in[i].
  virtual void gather(const Act& in, Rows which, Act out) = 0;
  virtual void scatter(const Act& in, Rows which, Act out) = 0;
  // y[summary_rows[i], col0 + c] = mix * ys[i, c] + (1 - mix) * y[summary_rows[i], col0 + c], c < ys.cols (y
  // and ys narrow).
  virtual void blend(Act y, int64_t col0, const Act& ys, double mix) = 0;
  // qkv [n, (Hq + 2 Hkv) D] holds q, k, v side by side (narrow: on the GPU bf16, as the reference's bf16
  // linears round them). Per-head RMSNorm of q and k, RoPE at the step's positions; results in the cache
  // dtype into qc, kc; v rounded into vc. qkv may be changed.
  virtual void qk_norm_rope(Act qkv, const Weight& qn, const Weight& kn, float eps, double theta, int64_t Hq,
                            int64_t Hkv, int64_t D, Act qc, Act kc, Act vc) = 0;
  // Attention of the step's rows of every sequence through layer `layer`'s cache (prefill kernel for fresh
  // sequences, decode kernel through the cache otherwise), writing the new K/V into the cache.
  virtual void attention(size_t layer, int64_t W, const Act& qc, const Act& kc, const Act& vc, int64_t Hq, Act out) = 0;
  // gu [n, 2I] holds gate and up side by side (narrow): out [n, I] = silu(gate) * up (narrow), in fp32.
  virtual void silu_mul(const Act& gu, Act out) = 0;
  // out [n, I] = silu(x gate^T) * (x up^T) (narrow): linear_cat into a narrow [rows, 2I] scratch, then
  // silu_mul, kSwigluRows rows at a time; a backend may join the two (CUDA: in the thin product's epilogue),
  // with the same result.
  // scratch: [min(x.rows, kSwigluRows), >= 2 out.cols] narrow, for the gate|up product before the gate. The
  // model takes it once per step and every layer reuses it (taken per call, a prefill piece's steps held 36
  // such products at once, 3.2 GiB for 1,152 rows of the 4B shape); in slices of kSwigluRows rows it stays
  // 20 MB (bf16) for the 4B shape at any piece size. A 512-row product is still past the GPU's
  // compute-to-bandwidth ridge; measured on an H100, a 128K prefill ran as fast with slices as without
  // (docs/engine.md).
  static constexpr int64_t kSwigluRows = 512;
  virtual void linear_swiglu(const Act& x, const Weight& gate, const Weight& up, Act out, Act scratch) {
    const Weight* ws[2] = {&gate, &up};
    for (int64_t r0 = 0; r0 < x.rows; r0 += kSwigluRows) {
      const int64_t n = std::min(kSwigluRows, x.rows - r0);
      Act xs = row_range(x, r0, n), os = row_range(out, r0, n), ss = scratch;
      ss.rows = n, ss.cols = 2 * out.cols;
      linear_cat(xs, ws, ss);
      silu_mul(ss, os);
    }
  }
  // The residual adds and norms joined to their products (model.cpp). A backend may join each pair (CUDA: the
  // product's epilogue adds, and the thin product's blocks normalise x themselves); the defaults below are
  // the separate ops, with the same result.
  // x += a W^T (x wide, [rows, W.rows]): the product's values in fp32, then added (no default: the CPU adds
  // from a buffer of its own, the GPU in the product).
  virtual void linear_add(const Act& a, const Weight& W, Act x) = 0;
  // y = linear_cat(RMSNorm(x) * w, ws); h: narrow, x's shape, for the normed rows.
  virtual void rms_norm_linear_cat(const Act& x, const Weight& w, float eps, std::span<const Weight* const> ws, Act y,
                                   Act h) {
    rms_norm(x, w, Weight{}, eps, h);
    linear_cat(h, ws, y);
  }
  // out = linear_swiglu(RMSNorm(x) * w, gate, up); h as above, scratch as linear_swiglu's.
  virtual void rms_norm_swiglu(const Act& x, const Weight& w, float eps, const Weight& gate, const Weight& up, Act out,
                               Act h, Act scratch) {
    rms_norm(x, w, Weight{}, eps, h);
    linear_swiglu(h, gate, up, out, scratch);
  }
  // Logits rows [m, V] (fp32) to the host.
  virtual void download(const Act& logits, std::span<float> out) = 0;
  // One token per request from its logits row (penalties applied in place first).
  virtual void sample(const Act& logits, std::span<const SampleReq> reqs, std::span<int32_t> out) = 0;
  // Waits for the step's work (errors of asynchronous work surface here).
  virtual void finish_step() = 0;
  // Drops work the backend prepared ahead for a step that may not come (CUDA: the next step's decode plans,
  // which hold cache blocks). The model calls it before it adds or releases a sequence in the caches.
  virtual void settle() {}
  // How the backend's steps ran with CUDA graphs: replays, eager steps, captures and why (zeros elsewhere).
  virtual GraphStats graph_stats() const { return {}; }
  // Where the replayed steps' time went (Model::replay_times; zeros without graphs).
  virtual ReplayTimes replay_times() const { return {}; }
  // Steps that used the decode plans made during the step before, and such plans dropped (CUDA; 0 elsewhere).
  virtual int64_t plans_ahead_used() const { return 0; }
  virtual int64_t plans_ahead_dropped() const { return 0; }

  // Device memory: peak and current bytes the backend allocated (0 on the CPU).
  virtual int64_t device_bytes_peak() const { return 0; }
  virtual Model::DeviceMemory device_memory_at_peak() const { return {}; }
  // Device memory still free (CUDA), or -1 on the CPU.
  virtual int64_t device_bytes_free() const { return -1; }
};

struct BackendOptions {
  int threads = 0;                    // CPU threads
  int64_t continuation_tokens = 128;  // CUDA: text tokens per continuation step (sets the ring slack)
  int64_t prefill_tokens = ModelOptions::kDefaultPrefillTokens;  // CUDA: text tokens per prefill piece
  int64_t q_heads = 1;                // query heads (CUDA plans a step's decode at begin_step)
  bool cuda_graphs = true;            // CUDA: replay continuation steps as graphs (ModelOptions::cuda_graphs)
  bool cuda_gemv = true;              // CUDA: ksa's GEMV for products of <= 8 rows (ModelOptions::cuda_gemv)
  bool gemm_autotune = false;         // CUDA: cuBLASLt's candidates timed (ModelOptions::cuda_gemm_autotune)
  int gemv_shape = 0;                 // CUDA: the GEMV's block shape for batch-1 products (cuda_gemv_shape)
  bool plan_ahead = true;             // CUDA: plan step t+1's decode during step t (ModelOptions::cuda_plan_ahead)
  bool batch_invariant = false;       // CPU: ModelOptions::batch_invariant
};

std::unique_ptr<Backend> make_cpu_backend(const BackendOptions& opt);
// Throws ksa::Error when the build has no CUDA or no device is visible.
std::unique_ptr<Backend> make_cuda_backend(const BackendOptions& opt);

}  // namespace ksa::engine
