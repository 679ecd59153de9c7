// Dense CUDA operations of the Qwen3-KSA forward (the GPU twin of ksa/dense.hpp): matrix products through
// cuBLASLt and small fused kernels for the rest. Device pointers; every call is asynchronous on `stream`.
// Activations: the residual stream and matrix-product outputs fp32, matrix-product inputs bf16; weights bf16.
// No CUDA includes, so host code can use it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "ksa/cuda.hpp"
#include "ksa/dtype.hpp"

namespace ksa::cuda {

// y[M, N] = x[M, K] W^T, x and W [N, K] row-major bf16, y f32 or bf16 (row stride ldy >= N; 0 = N), fp32
// accumulation. Holds a cuBLASLt handle, a workspace and the algorithm chosen per shape. Products of at most
// kGemvMaxM rows (decode steps of a few sequences) run ksa's own kernel that streams W at memory bandwidth
// (K a multiple of 8, 16-byte aligned x and W), unless `small_m_kernel` is false (cuBLASLt for every shape).
inline constexpr int64_t kGemvMaxM = 8;
class Gemm {
 public:
  // small_m_kernel: products of at most 8 rows through ksa's thin kernel (else cuBLASLt). autotune: each
  // cuBLASLt product class (rows rounded up to a power of two, K, N, output) runs the fastest of cuBLASLt's
  // first 8 candidates, timed on its first use outside a CUDA graph capture (a host wait of a few ms once per
  // class); otherwise cuBLASLt's first choice.
  explicit Gemm(CudaStream stream, bool small_m_kernel = true, bool autotune = false);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;
  void run(const void* x, int64_t M, int64_t K, const void* W, int64_t N, void* y, DType ydt, int64_t ldy = 0);
  // out[M, I] = bf16(silu(x Wg^T) * (x Wu^T)) for Wgu = [Wg; Wu] ([2I, K]) in one pass (the values of run()
  // into fp32, then silu_mul), for products thin enough for ksa's kernel: swiglu_fits() (otherwise run() and
  // silu_mul; run_swiglu throws).
  bool swiglu_fits(const void* x, int64_t M, int64_t K, const void* Wgu, int64_t I) const;
  void run_swiglu(const void* x, int64_t M, int64_t K, const void* Wgu, int64_t I, void* out);
  // y[M, N] += x W^T into fp32 y (the residual stream): the thin kernel's epilogue adds, or cuBLASLt with
  // beta = 1; the same sums as run() into a buffer and add().
  void run_add(const void* x, int64_t M, int64_t K, const void* W, int64_t N, float* y, int64_t ldy = 0);
  // The product of bf16(x / rms(x) * norm_w) (x fp32 [M, K], norm_w bf16 [K]: the values rms_norm() writes)
  // with W, without the normed rows in memory: every block of the thin kernel normalises x itself. glu: W is
  // [Wg; Wu] ([2N, K]) and y = bf16(silu(.. Wg^T) * (.. Wu^T)) as run_swiglu. Only where norm_fits() (at most
  // kGemvMaxM rows, K <= 4096); run_norm throws otherwise.
  bool norm_fits(const float* x, int64_t M, int64_t K, const void* W, int64_t N) const;
  void run_norm(const float* x, int64_t M, int64_t K, const void* norm_w, float eps, const void* W, int64_t N,
                void* y, DType ydt, int64_t ldy, bool glu);
  // The block shapes of the thin kernel that `ksa bench-gemm` compares on batch-1 products (0 = the default,
  // what the engine runs); products of more rows keep the default.
  static int gemv_shapes();
  static std::string gemv_shape_name(int shape);
  void set_gemv_shape(int shape);
  // Product classes autotuned so far (0 without autotune).
  int64_t tuned_classes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// x[r, :] = float(table[ids[r], :]) for n rows of H (table bf16).
void embed_rows(const void* table, const int32_t* ids, int64_t n, int64_t H, float* x, CudaStream stream);
// out[r] = bf16(x[r] / rms(x[r]) * w) with w = ws for rows where is_summary[r] != 0 (ws, is_summary may be
// null). The sum of squares in fp32 (two-level tree).
void rms_norm(const float* x, int64_t rows, int64_t n, const void* w, const void* ws, const uint8_t* is_summary,
              float eps, void* out, CudaStream stream);
// x += h over `count` floats.
void add(float* x, const float* h, int64_t count, CudaStream stream);
// out[i, :] = in[rows[i], :] (gather) or out[rows[i], :] = in[i, :] (scatter), rows of `row_bytes` (a multiple
// of 4).
void gather_rows(const void* in, int64_t row_bytes, const int32_t* rows, int64_t m, void* out, CudaStream stream);
void scatter_rows(const void* in, int64_t row_bytes, const int32_t* rows, int64_t m, void* out, CudaStream stream);
// y[rows[i] * ldy + c] = mix * ys[i * cols + c] + (1 - mix) * y[rows[i] * ldy + c] for c < cols, in fp32; y
// and ys both of dtype dt (f32 or bf16).
void blend_rows(void* y, DType dt, int64_t ldy, const void* ys, const int32_t* rows, int64_t m, int64_t cols,
                double mix, CudaStream stream);
// table [n, D/2] pairs (cos, sin), fp32: of positions[r] * inv_freq[i] (inv_freq [D/2] fp32, as the reference
// computes it; the angle in fp32, cos and sin in double). One table serves every layer of a step.
void rope_table(const int32_t* positions, int64_t n, int64_t D, const float* inv_freq, float* table, CudaStream stream);
// qkv [n, (Hq + 2 Hkv) D] (f32 or bf16, dt) holds q, k, v side by side. Per-head RMSNorm (weights qn, kn [D],
// bf16) of q and k in fp32, then RoPE (HF rotate_half) with the (cos, sin) pairs of rope [n, D/2]
// (rope_table), rounded to bf16 into qc [n, Hq D], kc [n, Hkv D]; v rounded into vc [n, Hkv D].
void qk_norm_rope(const void* qkv, DType dt, int64_t n, int64_t Hq, int64_t Hkv, int64_t D, const void* qn,
                  const void* kn, float eps, const float* rope, void* qc, void* kc, void* vc, CudaStream stream);
// gu [n, 2I] (fp32 or bf16, dt) holds gate and up side by side: out [n, I] = bf16(silu(gate) * up), in fp32.
void silu_mul(const void* gu, DType dt, int64_t n, int64_t I, void* out, CudaStream stream);

// One token drawn per logits row (the same order of operations as ksa::sample_token: penalties, then greedy
// or temperature with top-k, top-p and min-p cuts, then the token at cumulative probability u). The cuts are
// found by radix selection over the logits' bits, so tokens tied at a cut are all kept, and the draw walks
// the kept tokens in id order: the same u picks the same token on every run (integer mass sums, no float
// atomics), but not the token the CPU's sorted walk picks.
struct SampleArgs {
  int64_t row = 0;          // logits row
  float temperature = 0.f;  // 0: greedy (ties to the lowest id)
  int32_t top_k = 0;
  float top_p = 1.f, min_p = 0.f;
  float repetition_penalty = 1.f, presence_penalty = 0.f, frequency_penalty = 0.f;
  double u = 0;                   // in [0, 1)
  int32_t hist0 = 0, hist_n = 0;  // [hist0, hist0 + hist_n) of the (token, count) pairs
};
// logits [rows, V] (row stride V) modified in place by the penalties; args [n], pairs [*][2] device memory.
void sample_tokens(float* logits, int64_t V, const SampleArgs* args, int64_t n, const int32_t* pairs, int32_t* out,
                   CudaStream stream);

}  // namespace ksa::cuda
