// The CPU backend of the engine (backend.hpp): fp32 activations, the ksa::cpu dense kernels and attention
// (the prefill kernel for fresh sequences, the decode kernel through ksa::KvCache otherwise), weights read
// in place from the mmap'ed checkpoint: bf16/f32 through ksa::cpu::linear, q8_0 matrices through
// ksa::cpu::linear_q8_0 on the file's blocks (no dequantised copy; embedding rows dequantised as looked up).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

#include "ksa/cpu.hpp"
#include "ksa/decode.hpp"
#include "ksa/dense.hpp"
#include "ksa/error.hpp"
#include "model/arena.hpp"
#include "model/backend.hpp"

namespace ksa::engine {
namespace {

// The CPU's activation memory: 64-byte aligned host chunks, zero-filled as taken. (A fresh vector per
// activation cost each large one an mmap, its page faults and a memset per token: a quarter of a small
// model's decode time.)
struct HostMem {
  using Ptr = HostPtr;
  static constexpr size_t kAlign = 64, kMinChunk = size_t(1) << 20;
  static Ptr alloc(size_t bytes) {
    void* p = std::aligned_alloc(kAlign, bytes);
    if (!p) fail("out of memory allocating ", bytes, " bytes of activations");
    return Ptr(p);
  }
  static void fresh(void* p, size_t bytes) { std::memset(p, 0, bytes); }
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const BackendOptions& o)
      : threads_(o.threads > 0 ? o.threads : int(std::max(1u, std::thread::hardware_concurrency()))),
        batch_invariant_(o.batch_invariant) {}

  std::string name() const override { return "cpu (" + std::to_string(threads_) + " threads)"; }
  DType dtype(Prec p) const override { return p == Prec::cache ? kv_dtype_ : DType::f32; }

  Weight place(const TensorInfo* t) override {
    Weight w;
    if (!t) return w;
    // q8_0 blocks are read byte-wise: any address will do (never copied).
    auto mem = std::make_shared<AlignedData>(*t, t->dtype == DType::q8_0 ? 1 : size_t(dtype_size(t->dtype)));
    w.data = mem->data();
    w.keep = mem;
    w.dtype = t->dtype;
    w.rows = t->shape.size() >= 2 ? t->shape[0] : 1;
    w.cols = t->shape.empty() ? 1 : t->shape.back();
    w.nbytes = t->nbytes;
    return w;
  }

  void create_caches(const std::vector<KvCacheConfig>& layers) override {
    caches_.clear();
    for (const KvCacheConfig& c : layers) caches_.emplace_back(c);
    kv_dtype_ = layers.empty() ? DType::f32 : layers[0].dtype;
  }
  KvCache& cache(size_t layer) override { return caches_[layer]; }
  int64_t max_continuation_tokens(int64_t) const override { return int64_t(1) << 62; }

  void begin_step(const StepDesc& step) override {
    step_ = &step;
    arena_.reset();
  }

  void* take(size_t bytes) override { return arena_.take(bytes); }

  void embed(const Weight& table, Act x) override {
    float* y = f32(x);
    if (table.dtype == DType::q8_0) {  // a row is cols / 32 whole blocks
      const int64_t row_bytes = dtype_bytes(DType::q8_0, x.cols);
      for (int64_t r = 0; r < x.rows; ++r)
        cpu::dequantize_q8_0(static_cast<const std::byte*>(table.data) + int64_t(step_->ids[size_t(r)]) * row_bytes,
                             x.cols, y + r * x.cols);
      return;
    }
    for (int64_t r = 0; r < x.rows; ++r)
      for (int64_t i = 0; i < x.cols; ++i)
        y[r * x.cols + i] = load_as_float(table.dtype, table.data, int64_t(step_->ids[size_t(r)]) * x.cols + i);
  }

  void rms_norm(const Act& x, const Weight& w, const Weight& ws, float eps, Act out) override {
    std::copy_n(f32(x), x.rows * x.cols, f32(out));
    if (ws && !step_->summary_rows.empty()) {
      size_t s = 0;
      for (int64_t r = 0; r < x.rows; ++r) {
        const bool summary = s < step_->summary_rows.size() && step_->summary_rows[s] == r;
        s += summary;
        const Weight& wr = summary ? ws : w;
        cpu::rms_norm(f32(out) + r * x.cols, 1, x.cols, wr.data, wr.dtype, eps);
      }
      return;
    }
    cpu::rms_norm(f32(out), x.rows, x.cols, w.data, w.dtype, eps);
  }

  void linear_add(const Act& a, const Weight& W, Act x) override {
    tmp_.resize(size_t(x.rows * x.cols));
    product(f32(a), a.rows, a.cols, W, x.cols, tmp_.data());
    float* y = f32(x);
    for (int64_t i = 0; i < x.rows * x.cols; ++i) y[i] += tmp_[size_t(i)];
  }

  void linear(const Act& x, const Weight& W, Act y) override { product(f32(x), x.rows, x.cols, W, y.cols, f32(y)); }

  void linear_cat(const Act& x, std::span<const Weight* const> ws, Act y) override {
    int64_t col0 = 0;
    for (const Weight* W : ws) {
      tmp_.resize(size_t(x.rows * W->rows));
      product(f32(x), x.rows, x.cols, *W, W->rows, tmp_.data());
      for (int64_t r = 0; r < x.rows; ++r) std::copy_n(tmp_.data() + r * W->rows, W->rows, f32(y) + r * y.cols + col0);
      col0 += W->rows;
    }
  }

  void gather(const Act& in, Rows which, Act out) override {
    const std::vector<int32_t>& rows = select(which);
    for (size_t i = 0; i < rows.size(); ++i)
      std::copy_n(f32(in) + rows[i] * in.cols, in.cols, f32(out) + int64_t(i) * in.cols);
  }
  void scatter(const Act& in, Rows which, Act out) override {
    const std::vector<int32_t>& rows = select(which);
    for (size_t i = 0; i < rows.size(); ++i)
      std::copy_n(f32(in) + int64_t(i) * in.cols, in.cols, f32(out) + rows[i] * in.cols);
  }

  void blend(Act y, int64_t col0, const Act& ys, double mix) override {
    const std::vector<int32_t>& rows = step_->summary_rows;
    for (size_t i = 0; i < rows.size(); ++i)
      for (int64_t c = 0; c < ys.cols; ++c) {
        float& dst = f32(y)[rows[i] * y.cols + col0 + c];
        const float s = f32(ys)[int64_t(i) * ys.cols + c];
        dst = mix == 1.0 ? s : float(mix * s + (1.0 - mix) * dst);
      }
  }

  void qk_norm_rope(Act qkv, const Weight& qn, const Weight& kn, float eps, double theta, int64_t Hq, int64_t Hkv,
                    int64_t D, Act qc, Act kc, Act vc) override {
    const int64_t n = qkv.rows, NQ = Hq * D, NKV = Hkv * D;
    for (int64_t r = 0; r < n; ++r) {
      float* q = f32(qkv) + r * qkv.cols;
      float* k = q + NQ;
      const float* v = k + NKV;
      cpu::rms_norm(q, Hq, D, qn.data, qn.dtype, eps);
      cpu::rms_norm(k, Hkv, D, kn.data, kn.dtype, eps);
      cpu::rope(q, Hq, D, step_->positions[size_t(r)], theta);
      cpu::rope(k, Hkv, D, step_->positions[size_t(r)], theta);
      for (int64_t i = 0; i < NQ; ++i) store_from_float(qc.dtype, qc.data, r * NQ + i, q[i]);
      for (int64_t i = 0; i < NKV; ++i) store_from_float(kc.dtype, kc.data, r * NKV + i, k[i]);
      for (int64_t i = 0; i < NKV; ++i) store_from_float(vc.dtype, vc.data, r * NKV + i, v[i]);
    }
  }

  void attention(size_t layer, int64_t W, const Act& qc, const Act& kc, const Act& vc, int64_t Hq, Act out) override {
    KvCache& cache = caches_[layer];
    const KvCacheConfig& cc = cache.config();
    const int64_t Hkv = cc.Hkv, D = cc.D, esz = dtype_size(kv_dtype_);
    ob_.resize(size_t(qc.rows * Hq * D * esz));
    auto at = [&](const Act& a, int64_t row, int64_t H) {
      return static_cast<const std::byte*>(a.data) + row * H * D * esz;
    };
    std::vector<SeqId> ids;
    std::vector<int64_t> n_new;
    int64_t cont_rows = 0;
    for (const StepSeq& s : step_->seqs) {
      if (s.fresh) {
        if (s.cached != 0) fail("engine: internal error: the CPU backend prefills fresh sequences only");
        const StreamGeometry geo = cc.geometry();
        AttentionParams p = dense_params(
            geo.layout(geo.counts(s.n).T), W, 1, Hq, Hkv, D, kv_dtype_,
            {at(qc, s.row0, Hq), at(kc, s.row0, Hkv), at(vc, s.row0, Hkv), ob_.data() + s.row0 * Hq * D * esz});
        p.num_threads = threads_;
        cpu::attention_forward(p);
        cache.prefill(s.cache_id, KvRows::dense(at(kc, s.row0, Hkv), s.n, Hkv, D, kv_dtype_),
                      KvRows::dense(at(vc, s.row0, Hkv), s.n, Hkv, D, kv_dtype_));
      } else {
        if (s.row0 != cont_rows) fail("engine: internal error: continuing sequences must come first, packed");
        ids.push_back(s.cache_id);
        n_new.push_back(s.n);
        cont_rows += s.n;
      }
    }
    if (!ids.empty()) {
      DecodeIO io;
      io.Hq = Hq;
      io.dtype = kv_dtype_;
      io.q = TensorView::dense(qc.data, cont_rows, Hq, D);
      io.k = TensorView::dense(kc.data, cont_rows, Hkv, D);
      io.v = TensorView::dense(vc.data, cont_rows, Hkv, D);
      io.out = TensorView::dense(ob_.data(), cont_rows, Hq, D);
      io.num_threads = threads_;
      cpu::attention_decode(cache, ids, n_new, io);
    }
    for (int64_t i = 0; i < out.rows * out.cols; ++i) f32(out)[i] = load_as_float(kv_dtype_, ob_.data(), i);
  }

  void silu_mul(const Act& gu, Act out) override {
    const int64_t I = out.cols;
    for (int64_t r = 0; r < gu.rows; ++r) {
      std::copy_n(f32(gu) + r * 2 * I, I, f32(out) + r * I);
      cpu::silu_mul(f32(out) + r * I, f32(gu) + r * 2 * I + I, I);
    }
  }

  void download(const Act& logits, std::span<float> out) override {
    if (int64_t(out.size()) != logits.rows * logits.cols) fail("engine: internal error: logits size");
    std::copy_n(f32(logits), out.size(), out.data());
  }

  void sample(const Act& logits, std::span<const SampleReq> reqs, std::span<int32_t> out) override {
    row_.resize(size_t(logits.cols));
    for (size_t i = 0; i < reqs.size(); ++i) {
      std::copy_n(f32(logits) + reqs[i].logits_row * logits.cols, logits.cols, row_.data());
      out[i] = sample_token(row_, reqs[i].history, *reqs[i].cfg, reqs[i].u, idx_, prob_);
    }
  }

  void finish_step() override {}

 private:
  static float* f32(const Act& a) { return static_cast<float*>(a.data); }
  // y[M, N] = x[M, K] . W[:N]^T, W in its stored type (q8_0 blocks read in place).
  void product(const float* x, int64_t M, int64_t K, const Weight& W, int64_t N, float* y) const {
    if (W.dtype == DType::q8_0) cpu::linear_q8_0(x, M, K, W.data, N, y, threads_, batch_invariant_);
    else cpu::linear(x, M, K, W.data, W.dtype, N, y, threads_, batch_invariant_);
  }
  const std::vector<int32_t>& select(Rows which) const {
    return which == Rows::summary ? step_->summary_rows : step_->logits_rows;
  }

  int threads_;
  bool batch_invariant_ = false;
  DType kv_dtype_ = DType::f32;
  std::vector<KvCache> caches_;
  const StepDesc* step_ = nullptr;
  BumpArena<HostMem> arena_;
  std::vector<std::byte> ob_;
  std::vector<int32_t> idx_;
  std::vector<float> prob_, row_;
  std::vector<float> tmp_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const BackendOptions& opt) { return std::make_unique<CpuBackend>(opt); }

}  // namespace ksa::engine

#ifndef KSA_HAVE_CUDA_ENGINE
namespace ksa {
namespace engine {
std::unique_ptr<Backend> make_cuda_backend(const BackendOptions&) {
  fail("this build of ksa has no CUDA engine (nvcc was not found at build time); use --device cpu");
}
}  // namespace engine
bool cuda_engine_available() { return false; }
}  // namespace ksa
#endif
