// The CUDA backend of the engine (model/backend.hpp): bf16 weights uploaded once, fp32 residual stream, bf16
// matrix-product inputs, cuBLASLt products (ksa::cuda::Gemm), the dense kernels of ksa/cuda_dense.hpp, the
// prefill kernel (ksa::cuda::attention_forward) for fresh sequences and KvCacheGpu's decode for the others.
// Everything is queued on one stream; a step's only synchronisation is finish_step (after the sampled ids
// or logits are copied back).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <compare>
#include <cstring>
#include <map>
#include <unordered_map>

#include "cuda/check.cuh"
#include "ksa/cuda.hpp"
#include "ksa/cuda_cache.hpp"
#include "ksa/cuda_dense.hpp"
#include "ksa/error.hpp"
#include "model/arena.hpp"
#include "model/backend.hpp"

namespace ksa::engine {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) cuda::detail::cuda_failed(e, "while ", what);
}

struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};

std::shared_ptr<void> device_alloc(int64_t bytes, const char* what) {
  void* p = nullptr;
  check(cudaMalloc(&p, size_t(std::max<int64_t>(bytes, 16))), what);
  return std::shared_ptr<void>(p, DeviceFree{});
}

// The GPU's activation memory: device chunks of at least 64 MiB, takes 256-byte aligned, not cleared.
struct DeviceMem {
  using Ptr = std::shared_ptr<void>;
  static constexpr size_t kAlign = 256, kMinChunk = size_t(64) << 20;
  static Ptr alloc(size_t bytes) { return device_alloc(int64_t(bytes), "allocating activations"); }
  static void fresh(void*, size_t) {}
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const BackendOptions& o) : opt_(o) {
    if (cuda::device_count() == 0) fail("no CUDA device is visible (use --device cpu)");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "creating a stream");
    check(cudaStreamCreateWithFlags(&ahead_stream_, cudaStreamNonBlocking), "creating a stream");
    check(cudaEventCreate(&ahead_free_), "creating an event");
    check(cudaEventCreateWithFlags(&ahead_ready_, cudaEventDisableTiming), "creating an event");
    check(cudaEventCreate(&ahead_copied_), "creating an event");
    for (cudaEvent_t* e : {&graph_t0_, &graph_t1_, &step_t0_ev_, &step_t1_ev_}) check(cudaEventCreate(e), "creating an event");
    gemm_ = std::make_unique<cuda::Gemm>(stream_, o.cuda_gemv, o.gemm_autotune);
    gemm_->set_gemv_shape(o.gemv_shape);
    desc_name_ = "cuda: " + cuda::device_description();
    size_t fr = 0, tot = 0;
    check(cudaMemGetInfo(&fr, &tot), "reading device memory");
    baseline_ = int64_t(tot - fr);
  }
  ~CudaBackend() override {
    abandon_capture();
    cudaStreamSynchronize(stream_);
    cudaStreamSynchronize(ahead_stream_);
    for (auto& [key, g] : graphs_) g.destroy();
    caches_.clear();
    gemm_.reset();
    cudaFreeHost(step_staging_.p);
    cudaFreeHost(sample_staging_.p);
    cudaEventDestroy(ahead_free_);
    cudaEventDestroy(ahead_ready_);
    cudaEventDestroy(ahead_copied_);
    for (cudaEvent_t e : {graph_t0_, graph_t1_, step_t0_ev_, step_t1_ev_}) cudaEventDestroy(e);
    cudaStreamDestroy(ahead_stream_);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return desc_name_; }
  DType dtype(Prec p) const override { return p == Prec::wide ? DType::f32 : DType::bf16; }

  Weight place(const TensorInfo* t) override {
    Weight w;
    if (!t) return w;
    if (t->dtype == DType::q8_0)  // Model::load refuses these first; no CUDA kernel reads q8_0 blocks
      fail(t->name, " is q8_0: q8_0 weights run on the CPU only (use --device cpu, or the bf16 checkpoint on the GPU)");
    w.dtype = DType::bf16;
    w.rows = t->shape.size() >= 2 ? t->shape[0] : 1;
    w.cols = t->shape.empty() ? 1 : t->shape.back();
    const int64_t n = t->nbytes / dtype_size(t->dtype);
    w.nbytes = n * 2;
    w.keep = device_alloc(w.nbytes, "uploading the weights");
    w.data = w.keep.get();
    if (t->dtype == DType::bf16) {
      check(cudaMemcpy(w.keep.get(), t->data, size_t(t->nbytes), cudaMemcpyHostToDevice), "uploading the weights");
    } else {  // f32 / f16 files: rounded to bf16 on the host, one tensor at a time
      std::vector<uint16_t> tmp(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) tmp[size_t(i)] = bf16::from_float(t->get(i));
      check(cudaMemcpy(w.keep.get(), tmp.data(), size_t(n) * 2, cudaMemcpyHostToDevice), "uploading the weights");
    }
    return w;
  }

  void create_caches(const std::vector<KvCacheConfig>& layers) override {
    caches_.clear();
    cuda::KvCacheGpuOptions o;
    o.read_scratch = cuda::KvCacheGpu::make_read_scratch();  // the layers' reads run one after another
    for (KvCacheConfig c : layers) {
      c.block_rows = 64;
      c.ring_slack_rows = std::max<int64_t>(0, opt_.continuation_tokens - 1);
      std::string why;
      if (!cuda::supports(c, &why)) fail("the CUDA engine cannot hold this model's KV cache: ", why);
      caches_.push_back(std::make_unique<cuda::KvCacheGpu>(c, stream_, o));
    }
  }
  KvCache& cache(size_t layer) override { return caches_[layer]->host(); }
  // KvCacheGpu's multi-token steps: up to ring slack + 1 text tokens, and in a layer that keeps one chunk's
  // summaries only (W*k >= context), the summaries of at most one chunk: such a step ends at a chunk's end.
  int64_t max_prefill_tokens() const override { return std::max<int64_t>(1, opt_.prefill_tokens); }
  int64_t max_continuation_tokens(int64_t T) const override {
    int64_t n = std::max<int64_t>(1, opt_.continuation_tokens);
    for (const auto& c : caches_)
      if (!c->config().stores_summaries()) {
        const int64_t chunk = c->config().spec.chunk_size;
        n = std::min(n, chunk - T % chunk);
      }
    return n;
  }

  void begin_step(const StepDesc& step) override {
    step_t0_ = std::chrono::steady_clock::now();
    between_s_ = std::chrono::duration<double>(step_t0_ - step_end_).count();
    ahead_s_ = wait_s_ = 0;
    up_ms_ = 0;
    up_late_ = false;
    if (ahead_made_) {  // the step before made plans for this one: when did their uploads land?
      if (cudaEventQuery(ahead_copied_) == cudaSuccess) {
        if (cudaEventElapsedTime(&up_ms_, ahead_free_, ahead_copied_) != cudaSuccess) up_ms_ = 0;
      } else {
        up_late_ = true;
      }
      cudaGetLastError();
    }
    ahead_made_ = false;
    replayed_ = false;
    abandon_capture();  // a step that threw while being captured
    mode_ = Mode::eager;
    step_ = &step;
    launched_ = false;
    check(cudaEventRecord(step_t0_ev_, stream_), "timing the step");
    arena_.reset([&] { check(cudaStreamSynchronize(stream_), "resizing the activation arena"); });
    const int64_t n = step.rows();
    // One upload: ids, positions, summary rows, logits rows (int32), is_summary (bytes).
    const size_t ni = size_t(n), ns = step.summary_rows.size(), nl = step.logits_rows.size();
    const size_t bytes = (2 * ni + ns + nl) * 4 + ni;
    char* h = static_cast<char*>(reserve(step_staging_, bytes));
    std::memcpy(h, step.ids.data(), ni * 4);
    std::memcpy(h + ni * 4, step.positions.data(), ni * 4);
    std::memcpy(h + 2 * ni * 4, step.summary_rows.data(), ns * 4);
    std::memcpy(h + (2 * ni + ns) * 4, step.logits_rows.data(), nl * 4);
    uint8_t* flags = reinterpret_cast<uint8_t*>(h + (2 * ni + ns + nl) * 4);
    std::memset(flags, 0, ni);
    for (int32_t r : step.summary_rows) flags[r] = 1;
    char* d = static_cast<char*>(arena_.take(bytes));
    check(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, stream_), "uploading the step");
    d_ids_ = reinterpret_cast<int32_t*>(d);
    d_pos_ = d_ids_ + ni;
    d_sum_ = d_pos_ + ni;
    d_log_ = d_sum_ + ns;
    d_flags_ = reinterpret_cast<uint8_t*>(d_log_ + nl);
    rope_ = nullptr;
    plan_decode(step);
    choose_mode(step);
  }

  void* take(size_t bytes) override { return arena_.take(bytes); }

  void embed(const Weight& table, Act x) override {
    if (mode_ == Mode::replay) return;
    cuda::embed_rows(table.data, d_ids_, x.rows, x.cols, f32(x), stream_);
  }

  void rms_norm(const Act& x, const Weight& w, const Weight& ws, float eps, Act out) override {
    if (mode_ == Mode::replay) return;
    cuda::rms_norm(f32(x), x.rows, x.cols, w.data, ws ? ws.data : nullptr, ws ? d_flags_ : nullptr, eps, out.data,
                   stream_);
  }

  void linear(const Act& x, const Weight& W, Act y) override {
    if (mode_ == Mode::replay) return;
    if (x.dtype != DType::bf16) fail("engine: internal error: a CUDA matrix product's input must be bf16");
    gemm_->run(x.data, x.rows, x.cols, W.data, y.cols, y.data, y.dtype);
  }

  // Whether the weights sit row after row in one allocation (fuse): one product takes them all.
  static bool adjacent(std::span<const Weight* const> ws) {
    bool adj = true;
    for (size_t i = 1; i < ws.size(); ++i)
      adj &= static_cast<const char*>(ws[i]->data) ==
             static_cast<const char*>(ws[i - 1]->data) + ws[i - 1]->rows * ws[i - 1]->cols * 2;
    return adj;
  }

  // One product when the weights sit row after row in one allocation (fuse), else one per weight into its
  // columns of y.
  void linear_cat(const Act& x, std::span<const Weight* const> ws, Act y) override {
    if (mode_ == Mode::replay) return;
    if (x.dtype != DType::bf16) fail("engine: internal error: a CUDA matrix product's input must be bf16");
    if (adjacent(ws)) {
      gemm_->run(x.data, x.rows, x.cols, ws[0]->data, y.cols, y.data, y.dtype);
      return;
    }
    int64_t col0 = 0;
    for (const Weight* W : ws) {
      gemm_->run(x.data, x.rows, x.cols, W->data, W->rows, static_cast<char*>(y.data) + col0 * dtype_size(y.dtype),
                 y.dtype, y.cols);
      col0 += W->rows;
    }
  }

  void fuse(std::span<Weight* const> ws) override {
    int64_t bytes = 0;
    for (Weight* w : ws) {
      if (!*w || w->cols != ws[0]->cols) return;
      bytes += w->nbytes;
    }
    std::shared_ptr<void> all = device_alloc(bytes, "uploading the weights");
    char* p = static_cast<char*>(all.get());
    for (Weight* w : ws) {
      check(cudaMemcpy(p, w->data, size_t(w->nbytes), cudaMemcpyDeviceToDevice), "uploading the weights");
      w->data = p;
      w->keep = all;
      p += w->nbytes;
    }
  }

  void gather(const Act& in, Rows which, Act out) override {
    if (mode_ == Mode::replay) return;
    cuda::gather_rows(in.data, in.cols * dtype_size(in.dtype), rows_of(which), out.rows, out.data, stream_);
  }
  void scatter(const Act& in, Rows which, Act out) override {
    if (mode_ == Mode::replay) return;
    cuda::scatter_rows(in.data, in.cols * dtype_size(in.dtype), rows_of(which), in.rows, out.data, stream_);
  }

  void blend(Act y, int64_t col0, const Act& ys, double mix) override {
    if (mode_ == Mode::replay) return;
    if (y.dtype != ys.dtype)
      fail("engine: internal error: a blend of ", dtype_name(ys.dtype), " into ", dtype_name(y.dtype));
    cuda::blend_rows(static_cast<char*>(y.data) + col0 * dtype_size(y.dtype), y.dtype, y.cols, ys.data, d_sum_, ys.rows,
                     ys.cols, mix, stream_);
  }

  void qk_norm_rope(Act qkv, const Weight& qn, const Weight& kn, float eps, double theta, int64_t Hq, int64_t Hkv,
                    int64_t D, Act qc, Act kc, Act vc) override {
    const float* rope = rope_table(qkv.rows, D, theta);
    if (mode_ == Mode::replay) return;
    cuda::qk_norm_rope(qkv.data, qkv.dtype, qkv.rows, Hq, Hkv, D, qn.data, kn.data, eps, rope, qc.data, kc.data,
                       vc.data, stream_);
  }

  // Continuing sequences: the decode planned at begin_step (their rows packed first); then fresh ones through
  // the prefill kernel, their K/V into the cache (queued after the decode, which reads the plan workspace that
  // a prefill's writes reuse).
  void attention(size_t layer, int64_t W, const Act& qc, const Act& kc, const Act& vc, int64_t Hq, Act out) override {
    if (mode_ == Mode::replay) return;
    cuda::KvCacheGpu& cache = *caches_[layer];
    const KvCacheConfig& cc = cache.config();
    const int64_t Hkv = cc.Hkv, D = cc.D;
    auto at = [&](const Act& a, int64_t row, int64_t H) { return static_cast<char*>(a.data) + row * H * D * 2; };
    if (decode_rows_ > 0) {
      DecodeIO io;
      io.Hq = Hq;
      io.dtype = DType::bf16;
      io.q = TensorView::dense(qc.data, decode_rows_, Hq, D);
      io.k = TensorView::dense(kc.data, decode_rows_, Hkv, D);
      io.v = TensorView::dense(vc.data, decode_rows_, Hkv, D);
      io.out = TensorView::dense(out.data, decode_rows_, Hq, D);
      cache.launch(io, caps_[layer]);
    }
    for (const StepSeq& s : step_->seqs) {
      if (!s.fresh) continue;
      const int64_t r0 = s.cached, L = r0 + s.n, row_bytes = Hkv * D * 2;
      const StreamGeometry geo = cc.geometry();
      const Layout lay = geo.layout(geo.counts(L).T);
      if (r0 == 0) {
        AttentionParams p =
            dense_params(lay, W, 1, Hq, Hkv, D, DType::bf16,
                         {at(qc, s.row0, Hq), at(kc, s.row0, Hkv), at(vc, s.row0, Hkv), at(out, s.row0, Hq)});
        cuda::attention_forward(p, stream_);
      } else {
        // A piece of a prompt: its keys in the dense stream layout the prefill kernel reads (the cached rows
        // its rows can see, then its own), its queries from stream row r0 on (q and out shifted so that a
        // stream position indexes them).
        char* sk = static_cast<char*>(kv_scratch(2 * L * row_bytes));
        char* sv = sk + L * row_bytes;
        const SeqState st = cache.state(s.cache_id);
        cache.read_stream(s.cache_id, geo.live_text_begin(StreamCounts{st.text_tokens, st.summary_tokens}), 0,
                          TensorView::dense(sk, L, Hkv, D), TensorView::dense(sv, L, Hkv, D));
        check(cudaMemcpyAsync(sk + r0 * row_bytes, at(kc, s.row0, Hkv), size_t(s.n * row_bytes),
                              cudaMemcpyDeviceToDevice, stream_),
              "copying a prefill piece's keys");
        check(cudaMemcpyAsync(sv + r0 * row_bytes, at(vc, s.row0, Hkv), size_t(s.n * row_bytes),
                              cudaMemcpyDeviceToDevice, stream_),
              "copying a prefill piece's values");
        const int64_t q_shift = r0 * Hq * D * 2;
        AttentionParams p = dense_params(lay, W, 1, Hq, Hkv, D, DType::bf16,
                                         {at(qc, s.row0, Hq) - q_shift, sk, sv, at(out, s.row0, Hq) - q_shift});
        p.q_begin = r0;
        cuda::attention_forward(p, stream_);
      }
      cache.prefill(s.cache_id, KvRows::dense(at(kc, s.row0, Hkv), s.n, Hkv, D, DType::bf16),
                    KvRows::dense(at(vc, s.row0, Hkv), s.n, Hkv, D, DType::bf16));
    }
  }

  // Whether gate and up can run as one [gate; up] product into out's columns (the thin kernel's GLU form).
  static bool glu_pair(const Weight& gate, const Weight& up, const Act& out) {
    const Weight* ws[2] = {&gate, &up};
    return adjacent(ws) && gate.rows == out.cols && up.rows == out.cols;
  }

  // A few rows: the thin product's GLU epilogue. More: Backend::linear_swiglu ([gate | up] as one product into
  // the narrow scratch, bf16 here, then silu_mul). The same choice in every mode.
  void linear_swiglu(const Act& x, const Weight& gate, const Weight& up, Act out, Act scratch) override {
    if (x.dtype != DType::bf16 || !glu_pair(gate, up, out) ||
        !gemm_->swiglu_fits(x.data, x.rows, x.cols, gate.data, out.cols))
      return Backend::linear_swiglu(x, gate, up, out, scratch);
    if (mode_ != Mode::replay) gemm_->run_swiglu(x.data, x.rows, x.cols, gate.data, out.cols, out.data);
  }

  // The residual add in the product: the thin kernel's epilogue, or cuBLASLt with beta = 1.
  void linear_add(const Act& a, const Weight& W, Act x) override {
    if (mode_ == Mode::replay) return;
    if (a.dtype != DType::bf16 || x.dtype != DType::f32)
      fail("engine: internal error: a CUDA product with the residual add takes bf16 in, fp32 x");
    gemm_->run_add(a.data, a.rows, a.cols, W.data, x.cols, f32(x));
  }

  // The norm in the thin product (its blocks normalise x; no rows in h) where the product fits it, else the
  // separate ops. The choice depends only on shapes and addresses, the same in every mode.
  void rms_norm_linear_cat(const Act& x, const Weight& w, float eps, std::span<const Weight* const> ws, Act y,
                           Act h) override {
    if (!adjacent(ws) || !gemm_->norm_fits(f32(x), x.rows, x.cols, ws[0]->data, y.cols))
      return Backend::rms_norm_linear_cat(x, w, eps, ws, y, h);
    if (mode_ != Mode::replay)
      gemm_->run_norm(f32(x), x.rows, x.cols, w.data, eps, ws[0]->data, y.cols, y.data, y.dtype, y.cols, false);
  }

  void rms_norm_swiglu(const Act& x, const Weight& w, float eps, const Weight& gate, const Weight& up, Act out, Act h,
                       Act scratch) override {
    if (!glu_pair(gate, up, out) || !gemm_->norm_fits(f32(x), x.rows, x.cols, gate.data, 2 * out.cols))
      return Backend::rms_norm_swiglu(x, w, eps, gate, up, out, h, scratch);
    if (mode_ != Mode::replay)
      gemm_->run_norm(f32(x), x.rows, x.cols, w.data, eps, gate.data, out.cols, out.data, DType::bf16, out.cols, true);
  }

  void silu_mul(const Act& gu, Act out) override {
    if (mode_ != Mode::replay) cuda::silu_mul(gu.data, gu.dtype, out.rows, out.cols, out.data, stream_);
  }

  void download(const Act& logits, std::span<float> out) override {
    flush();
    if (int64_t(out.size()) != logits.rows * logits.cols) fail("engine: internal error: logits size");
    check(cudaMemcpyAsync(out.data(), logits.data, out.size() * 4, cudaMemcpyDeviceToHost, stream_), "copying logits");
    timed_sync();
  }

  void sample(const Act& logits, std::span<const SampleReq> reqs, std::span<int32_t> out) override {
    flush();
    std::vector<cuda::SampleArgs> args(reqs.size());
    std::vector<int32_t> pairs;
    for (size_t i = 0; i < reqs.size(); ++i) {
      const SamplerConfig& c = *reqs[i].cfg;
      cuda::SampleArgs& a = args[i];
      a.row = reqs[i].logits_row;
      a.temperature = c.temperature;
      a.top_k = int32_t(std::min<int64_t>(c.top_k, int64_t(1) << 30));
      a.top_p = c.top_p;
      a.min_p = c.min_p;
      a.repetition_penalty = c.repetition_penalty;
      a.presence_penalty = c.presence_penalty;
      a.frequency_penalty = c.frequency_penalty;
      a.u = reqs[i].u;
      a.hist0 = int32_t(pairs.size() / 2);
      if (c.repetition_penalty != 1.f || c.presence_penalty != 0.f || c.frequency_penalty != 0.f) {
        std::unordered_map<int32_t, int32_t> count;
        for (int32_t t : reqs[i].history)
          if (t >= 0 && t < logits.cols) ++count[t];
        for (const auto& [t, n] : count) pairs.insert(pairs.end(), {t, n});
      }
      a.hist_n = int32_t(pairs.size() / 2) - a.hist0;
    }
    const size_t ab = args.size() * sizeof(cuda::SampleArgs), pb = pairs.size() * 4, ob = reqs.size() * 4;
    char* h = static_cast<char*>(reserve(sample_staging_, ab + pb + ob + 16));
    std::memcpy(h, args.data(), ab);
    std::memcpy(h + ab, pairs.data(), pb);
    char* d = static_cast<char*>(arena_.take(size_t(ab + pb + ob)));
    check(cudaMemcpyAsync(d, h, ab + pb, cudaMemcpyHostToDevice, stream_), "uploading the sampler");
    int32_t* d_out = reinterpret_cast<int32_t*>(d + ab + pb);
    cuda::sample_tokens(f32(logits), logits.cols, reinterpret_cast<const cuda::SampleArgs*>(d), int64_t(reqs.size()),
                        reinterpret_cast<const int32_t*>(d + ab), d_out, stream_);
    check(cudaMemcpyAsync(h + ab + pb, d_out, ob, cudaMemcpyDeviceToHost, stream_), "copying the sampled ids");
    timed_sync();
    std::memcpy(out.data(), h + ab + pb, ob);
  }

  void finish_step() override {
    flush();
    check(cudaEventRecord(step_t1_ev_, stream_), "timing the step");
    check(cudaStreamSynchronize(stream_), "running the step");
    const auto end = std::chrono::steady_clock::now();
    if (replayed_) {
      float step_ms = 0, graph_ms = 0, pre_ms = 0, post_ms = 0;
      if (cudaEventElapsedTime(&step_ms, step_t0_ev_, step_t1_ev_) == cudaSuccess &&
          cudaEventElapsedTime(&graph_ms, graph_t0_, graph_t1_) == cudaSuccess &&
          cudaEventElapsedTime(&pre_ms, step_t0_ev_, graph_t0_) == cudaSuccess &&
          cudaEventElapsedTime(&post_ms, graph_t1_, step_t1_ev_) == cudaSuccess) {
        ReplayTimes& t = times_;
        ++t.steps;
        t.wall += std::chrono::duration<double>(end - step_t0_).count();
        t.host_before_launch += before_launch_s_;
        t.host_between += between_s_;
        t.host_ahead += ahead_s_;
        t.host_wait += wait_s_;
        t.device += 1e-3 * step_ms;
        t.graph += 1e-3 * graph_ms;
        t.before_graph += 1e-3 * pre_ms;
        t.after_graph += 1e-3 * post_ms;
        t.ahead_uploads += 1e-3 * up_ms_;
        t.ahead_late += up_late_;
      }
      cudaGetLastError();
    }
    step_end_ = end;
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess && int64_t(tot - fr) - baseline_ > peak_) {
      peak_ = int64_t(tot - fr) - baseline_;
      at_peak_ = Model::DeviceMemory{peak_, 0, int64_t(arena_.reserved()), scratch_bytes_};
      for (const auto& c : caches_) at_peak_.kv_cache += c->host().bytes_reserved();
    }
  }

  int64_t device_bytes_free() const override {
    size_t fr = 0, tot = 0;
    return cudaMemGetInfo(&fr, &tot) == cudaSuccess ? int64_t(fr) : -1;
  }

  Model::DeviceMemory device_memory_at_peak() const override { return at_peak_; }
  int64_t device_bytes_peak() const override {
    size_t fr = 0, tot = 0;
    int64_t now = 0;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) now = int64_t(tot - fr) - baseline_;
    return std::max(peak_, now);
  }

  ReplayTimes replay_times() const override { return times_; }
  int64_t plans_ahead_used() const override { return ahead_used_; }
  int64_t plans_ahead_dropped() const override { return ahead_dropped_; }

  void settle() override {
    if (!ahead_pending_) return;
    ahead_pending_ = false;
    ++ahead_dropped_;
    for (auto& c : caches_) c->cancel_decode();
    join_ahead();
  }

  // The dense K/V buffer of prefill pieces (grows; zero-filled when allocated, and only ever holds finite
  // keys afterwards: the prefill kernel multiplies masked keys of a partly visible tile by zero weights).
  void* kv_scratch(int64_t bytes) {
    if (bytes > scratch_bytes_) {
      bytes = (bytes + (int64_t(2) << 20) - 1) / (int64_t(2) << 20) * (int64_t(2) << 20);  // 2 MiB pages
      check(cudaStreamSynchronize(stream_), "growing the prefill key buffer");
      scratch_.reset();
      scratch_bytes_ = 0;
      scratch_ = device_alloc(bytes, "allocating the prefill key buffer");
      check(cudaMemsetAsync(scratch_.get(), 0, size_t(bytes), stream_), "clearing the prefill key buffer");
      scratch_bytes_ = bytes;
    }
    return scratch_.get();
  }
  GraphStats graph_stats() const override { return stats_; }

 private:
  // ---- decode planning and CUDA graphs
  // Every layer's decode of the step's continuing sequences is planned (validated, uploaded) here, before any
  // op runs: a plan that throws leaves every cache as it was, and the step's launches need no host work.
  void plan_decode(const StepDesc& step) {
    decode_rows_ = 0;
    std::vector<SeqId> ids;
    std::vector<int64_t> n_new;
    for (const StepSeq& s : step.seqs) {
      if (s.fresh) continue;
      if (s.row0 != decode_rows_) fail("engine: internal error: continuing sequences must come first, packed");
      ids.push_back(s.cache_id);
      n_new.push_back(s.n);
      decode_rows_ += s.n;
    }
    if (ahead_pending_) {
      if (ids == ahead_ids_ && n_new == ahead_n_) {  // the step planned during the one before
        ahead_pending_ = false;
        ++ahead_used_;
        join_ahead();
        for (auto& c : caches_) c->commit_decode();
        return;
      }
      settle();
    }
    if (ids.empty()) return;
    size_t i = 0;
    try {
      for (; i < caches_.size(); ++i) caches_[i]->plan_decode(ids, n_new, opt_.q_heads);
    } catch (...) {
      for (size_t j = 0; j < i; ++j) caches_[j]->cancel_decode();
      decode_rows_ = 0;
      throw;
    }
    for (auto& c : caches_) c->commit_decode();
  }

  // Plans the next step ahead, then waits for this one (both timed for replay_times). (Planning ahead before
  // the step's closing copies are queued instead was measured slower: H100, batch 64, the step's time after
  // the graph 771 us against 480.)
  void timed_sync() {
    const auto a = std::chrono::steady_clock::now();
    plan_ahead();
    const auto b = std::chrono::steady_clock::now();
    check(cudaStreamSynchronize(stream_), "running the step");
    ahead_s_ += std::chrono::duration<double>(b - a).count();
    wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - b).count();
  }

  // ---- planning ahead
  // While step t runs on the device, the host plans every layer's decode of the step most likely to follow:
  // each sequence of step t continued by one text token (with the summary rows that token completes), except
  // a prompt piece that returned no logits (its prompt goes on in the next step, through the prefill). The
  // plans are validated and packed here and their uploads queued on ahead_stream_ at once: they fill the
  // caches' other plan workspaces than step t's (KvCacheGpu alternates two), which only finished steps read,
  // so they land under step t's graph. The caches hold them open. The next begin_step
  // commits them if its continuing sequences are exactly those (the same ids, order and rows), else drops
  // them (settle; also before the model adds or releases a sequence). A dropped plan changes nothing.
  void plan_ahead() {
    if (!opt_.plan_ahead || ahead_pending_ || !launched_ || !step_ || step_->seqs.empty() || caches_.empty()) return;
    const StreamGeometry geo = caches_[0]->config().geometry();
    ahead_ids_.clear();
    ahead_n_.clear();
    const std::vector<int32_t>& lr = step_->logits_rows;  // increasing
    const auto logits_in = [&](int64_t r0, int64_t r1) {
      return std::lower_bound(lr.begin(), lr.end(), int32_t(r0)) != std::lower_bound(lr.begin(), lr.end(), int32_t(r1));
    };
    for (const StepSeq& s : step_->seqs) {
      // A prompt piece without logits is followed by the prompt's next piece (the prefill kernel, no decode
      // plan): a server's step of decoding sequences and one prompt piece is then planned right.
      if (s.fresh && !logits_in(s.row0, s.row0 + s.n)) continue;
      const SeqState st = caches_[0]->state(s.cache_id);
      ahead_ids_.push_back(s.cache_id);
      ahead_n_.push_back(geo.counts_after_text(st.text_tokens + 1).length() - st.stream_length());
    }
    if (ahead_ids_.empty()) return;
    size_t i = 0;
    try {
      for (; i < caches_.size(); ++i) caches_[i]->plan_decode_on(ahead_stream_, ahead_ids_, ahead_n_, opt_.q_heads);
    } catch (const Error&) {  // not a step that can run (the context limit, a full pool): planned if it comes
      for (size_t j = 0; j < i; ++j) caches_[j]->cancel_decode();
      join_ahead();
      return;
    }
    check(cudaEventRecord(ahead_copied_, ahead_stream_), "timing the next step's plans");
    ahead_pending_ = true;
    ahead_made_ = true;
  }
  // Later work on the step stream (the next plan's uploads, the next step's kernels) after the uploads queued
  // on ahead_stream_.
  void join_ahead() {
    check(cudaEventRecord(ahead_ready_, ahead_stream_), "ordering the next step's plans");
    check(cudaStreamWaitEvent(stream_, ahead_ready_, 0), "ordering the next step's plans");
  }

  // A step's shape: rows, summary rows, logits rows, sequences. Steps of one shape allocate the same
  // activations at the same addresses (while the arena keeps its chunks) and launch the same kernels.
  struct GraphKey {
    int64_t rows = 0, summaries = 0, logits = 0, seqs = 0;
    auto operator<=>(const GraphKey&) const = default;
  };
  // One executable graph per plan workspace slot (the caches alternate two, step by step): the one captured
  // and its copy with the decode kernels' plan arguments moved to the other slot (retarget_decode_graph), so
  // that a shape replays from its second step on whichever slot its steps fall.
  struct Graph {
    cudaGraphExec_t exec[2] = {nullptr, nullptr};
    std::vector<uint64_t> gens[2];  // per slot: the caches' plan workspaces it reads
    std::vector<int64_t> caps;      // attend CTAs per KV head, per layer (the plans' units fit under them)
    uint64_t arena = 0;             // the arena generation its activation addresses belong to
    void destroy() {
      for (cudaGraphExec_t& e : exec)
        if (e) cudaGraphExecDestroy(e), e = nullptr;
    }
  };
  enum class Mode { eager, capture, replay };

  int slot() const { return caches_.empty() ? 0 : caches_[0]->workspace_slot(); }

  // Why the step cannot replay g on its plan workspace slot (the GraphStats count of that cause), or null
  // when it can.
  int64_t GraphStats::*misfit(const Graph& g, int slot) const {
    if (!g.exec[slot]) return &GraphStats::other_slot;
    if (g.arena != arena_.generation()) return &GraphStats::arena_moved;
    for (size_t i = 0; i < caches_.size(); ++i) {
      if (g.gens[slot][i] != caches_[i]->workspace_generation()) return &GraphStats::plans_moved;
      if (caches_[i]->plan_stats().units > g.caps[i]) return &GraphStats::over_units;
    }
    return nullptr;
  }

  // Graphs only for steps that continue sequences and start none (the prefill kernel's launch depends on
  // the prompt). The first step of a shape runs eagerly (it also warms the matrix-product choices and
  // lazily made tables), the second is captured, later ones replay while the graph fits.
  void choose_mode(const StepDesc& step) {
    caps_.assign(caches_.size(), 0);
    if (!opt_.cuda_graphs) return;
    if (decode_rows_ == 0 || decode_rows_ != step.rows()) {
      ++stats_.eager_prompt;
      return;
    }
    const GraphKey key{step.rows(), int64_t(step.summary_rows.size()), int64_t(step.logits_rows.size()),
                       int64_t(step.seqs.size())};
    auto it = graphs_.find(key);
    int64_t GraphStats::*why = it == graphs_.end() ? &GraphStats::new_shape : misfit(it->second, slot());
    if (!why) {
      mode_ = Mode::replay;
      replay_exec_ = it->second.exec[slot()];
      return;
    }
    if (++seen_[key] < 2) {
      ++stats_.eager_first;
      return;
    }
    ++(stats_.*why);  // the capture's cause
    Graph g;
    for (size_t i = 0; i < caches_.size(); ++i) {
      int64_t cap = 1;  // the next power of two: a growing context recaptures O(log) times
      while (cap < caches_[i]->plan_stats().units) cap *= 2;
      g.caps.push_back(cap);
    }
    if (it != graphs_.end()) {  // the other slot's graph stays if it still fits (same grids, same arena)
      Graph& old = it->second;
      const int o = slot() ^ 1;
      if (old.exec[o] && old.caps == g.caps && old.arena == arena_.generation()) {
        std::swap(g.exec[o], old.exec[o]);
        g.gens[o] = old.gens[o];
      }
      old.destroy();
      graphs_.erase(it);
    }
    if (graphs_.size() >= kMaxGraphs) {  // many shapes (a server's changing batches): start over
      for (auto& [k, gr] : graphs_) gr.destroy();
      graphs_.clear();
      ++stats_.cleared;
    }
    caps_ = g.caps;
    pending_ = std::move(g);
    pending_key_ = key;
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed), "starting a CUDA graph capture");
    mode_ = Mode::capture;
  }

  // Ends the step's capture (instantiating and launching the graph) or launches its replay; afterwards every
  // launch of the step that reads a plan workspace is queued (ahead_free_ marks their end: replay_times
  // measures when the next step's plans landed from there).
  void flush() {
    struct Mark {
      CudaBackend& b;
      ~Mark() {
        if (!b.launched_ && cudaEventRecord(b.ahead_free_, b.stream_) == cudaSuccess) b.launched_ = true;
      }
    } mark{*this};
    if (mode_ == Mode::capture) {
      mode_ = Mode::eager;
      cudaGraph_t g = nullptr;
      cudaError_t e = cudaStreamEndCapture(stream_, &g);
      cudaGraphExec_t exec = nullptr;
      if (e == cudaSuccess) e = cudaGraphInstantiate(&exec, g, 0);
      if (e != cudaSuccess) {
        if (g) cudaGraphDestroy(g);
        opt_.cuda_graphs = false;
        cudaGetLastError();
        fail("capturing the step in a CUDA graph failed (", cudaGetErrorString(e),
             "); run without graphs (ksa: --no-cuda-graphs; ModelOptions::cuda_graphs = false)");
      }
      const int s = slot();
      pending_.exec[s] = exec;
      pending_.arena = arena_.generation();
      for (const auto& c : caches_) pending_.gens[s].push_back(c->workspace_generation(s));
      if (g && !pending_.exec[s ^ 1]) add_other_slot(g, pending_);
      if (g) cudaGraphDestroy(g);
      Graph& stored = graphs_[pending_key_] = std::move(pending_);
      ++stats_.captures;
      check(cudaGraphLaunch(stored.exec[s], stream_), "launching a CUDA graph");
    } else if (mode_ == Mode::replay) {
      mode_ = Mode::eager;
      ++stats_.replays;
      check(cudaEventRecord(graph_t0_, stream_), "timing a CUDA graph");
      check(cudaGraphLaunch(replay_exec_, stream_), "launching a CUDA graph");
      check(cudaEventRecord(graph_t1_, stream_), "timing a CUDA graph");
      replayed_ = true;
      before_launch_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_t0_).count();
    }
  }

  // The captured graph `g` made to serve the other plan workspace slot (when every cache has one): a copy
  // with the decode kernels' plan arguments moved there, instantiated. Best effort: on any failure the other
  // slot's steps capture their own graph.
  void add_other_slot(cudaGraph_t g, Graph& out) {
    const int s = slot(), o = s ^ 1;
    std::vector<const void*> from, to;
    for (const auto& c : caches_) {
      if (!c->workspace_address(o)) return;
      from.push_back(c->workspace_address(s));
      to.push_back(c->workspace_address(o));
    }
    cudaGraph_t copy = nullptr;
    cudaGraphExec_t exec = nullptr;
    try {
      if (cudaGraphClone(&copy, g) == cudaSuccess && cuda::retarget_decode_graph(copy, from, to) > 0 &&
          cudaGraphInstantiate(&exec, copy, 0) == cudaSuccess) {
        out.exec[o] = exec;
        for (const auto& c : caches_) out.gens[o].push_back(c->workspace_generation(o));
      }
    } catch (const Error&) {
    }
    if (copy) cudaGraphDestroy(copy);
    cudaGetLastError();
  }

  void abandon_capture() {
    if (mode_ != Mode::capture) return;
    mode_ = Mode::eager;
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(stream_, &g);
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
  }

  static float* f32(const Act& a) { return static_cast<float*>(a.data); }
  const int32_t* rows_of(Rows which) const { return which == Rows::summary ? d_sum_ : d_log_; }

  // Pinned host buffers: one for the step's rows (begin_step), one for the sampler, so that neither is
  // rewritten while the other's copy is still queued. Growing one waits for the stream.
  struct Pinned {
    void* p = nullptr;
    size_t cap = 0;
  };
  void* reserve(Pinned& b, size_t bytes) {
    if (bytes > b.cap) {
      check(cudaStreamSynchronize(stream_), "growing a staging buffer");
      cudaFreeHost(b.p);
      b.p = nullptr;
      const size_t n = std::max(bytes, b.cap * 2 + 4096);
      b.cap = 0;
      check(cudaMallocHost(&b.p, n), "allocating pinned host memory");
      b.cap = n;
    }
    return b.p;
  }

  // The step's RoPE (cos, sin) table for its n rows (cuda::rope_table), made by the first layer that asks
  // and read by all. Taken from the arena in every mode (a replay's takes repeat the capture's).
  const float* rope_table(int64_t n, int64_t D, double theta) {
    if (rope_ && rope_D_ == D && rope_theta_ == theta) return rope_;
    rope_ = static_cast<float*>(arena_.take(size_t(n * D) * sizeof(float)));
    rope_D_ = D;
    rope_theta_ = theta;
    if (mode_ != Mode::replay) cuda::rope_table(d_pos_, n, D, inv_freq(D, theta), rope_, stream_);
    return rope_;
  }

  // inv_freq[i] = 1 / theta^(2i/D) in fp32, as the CPU computes it (one table per (D, theta)).
  const float* inv_freq(int64_t D, double theta) {
    const auto key = std::make_pair(D, theta);
    auto it = inv_freq_.find(key);
    if (it != inv_freq_.end()) return static_cast<const float*>(it->second.get());
    std::vector<float> f(size_t(D / 2));
    for (int64_t i = 0; i < D / 2; ++i) f[size_t(i)] = 1.f / std::pow(float(theta), float(2 * i) / float(D));
    std::shared_ptr<void> d = device_alloc(int64_t(f.size() * 4), "uploading RoPE frequencies");
    check(cudaMemcpy(d.get(), f.data(), f.size() * 4, cudaMemcpyHostToDevice), "uploading RoPE frequencies");
    inv_freq_.emplace(key, d);
    return static_cast<const float*>(d.get());
  }

  BackendOptions opt_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::Gemm> gemm_;
  std::string desc_name_;
  std::vector<std::unique_ptr<cuda::KvCacheGpu>> caches_;
  std::map<std::pair<int64_t, double>, std::shared_ptr<void>> inv_freq_;
  BumpArena<DeviceMem> arena_;
  const StepDesc* step_ = nullptr;
  Pinned step_staging_, sample_staging_;
  int32_t *d_ids_ = nullptr, *d_pos_ = nullptr, *d_sum_ = nullptr, *d_log_ = nullptr;
  uint8_t* d_flags_ = nullptr;
  float* rope_ = nullptr;  // the step's RoPE table (rope_table), for head dim rope_D_ and rope_theta_
  int64_t rope_D_ = 0;
  double rope_theta_ = 0;
  int64_t baseline_ = 0, peak_ = 0;
  Model::DeviceMemory at_peak_;  // after the step that set peak_
  // decode and graphs
  static constexpr size_t kMaxGraphs = 64;
  int64_t decode_rows_ = 0;    // the step's rows of continuing sequences (planned at begin_step)
  std::vector<int64_t> caps_;  // per layer: attend CTAs per KV head the launches use (0 = the plan's units)
  Mode mode_ = Mode::eager;
  std::map<GraphKey, Graph> graphs_;
  std::map<GraphKey, int> seen_;
  cudaGraphExec_t replay_exec_ = nullptr;
  Graph pending_;
  GraphKey pending_key_;
  GraphStats stats_;  // replays, eager steps, captures and their causes (graph_stats)
  // Timing of replayed steps (replay_times): host clocks at begin_step, the graph's launch and the end of
  // finish_step; events at the step's start and end and around the graph.
  std::chrono::steady_clock::time_point step_t0_, step_end_;
  double before_launch_s_ = 0, between_s_ = 0, ahead_s_ = 0, wait_s_ = 0;
  bool replayed_ = false;
  cudaEvent_t graph_t0_ = nullptr, graph_t1_ = nullptr, step_t0_ev_ = nullptr, step_t1_ev_ = nullptr;
  ReplayTimes times_;
  // planning ahead (plan_ahead)
  cudaStream_t ahead_stream_ = nullptr;
  cudaEvent_t ahead_free_ = nullptr, ahead_ready_ = nullptr, ahead_copied_ = nullptr;
  bool ahead_made_ = false;  // this step made plans ahead (ahead_copied_ marks their uploads' end)
  float up_ms_ = 0;          // the plans this step uses: their uploads' end after the step before's launches
  bool up_late_ = false;     // ... had not landed when this step began
  bool launched_ = false;       // the step's launches are queued, ahead_free_ recorded after them
  bool ahead_pending_ = false;  // every cache holds an open plan made ahead, for ahead_ids_ / ahead_n_
  std::vector<SeqId> ahead_ids_;
  std::vector<int64_t> ahead_n_;
  int64_t ahead_used_ = 0, ahead_dropped_ = 0;
  std::shared_ptr<void> scratch_;  // kv_scratch
  int64_t scratch_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const BackendOptions& opt) { return std::make_unique<CudaBackend>(opt); }

}  // namespace ksa::engine

namespace ksa {
bool cuda_engine_available() { return cuda::device_count() > 0; }
}  // namespace ksa
