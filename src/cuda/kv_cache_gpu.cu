// ksa::cuda::KvCacheGpu (include/ksa/cuda_cache.hpp): ksa::KvCache's bookkeeping over device slabs, and the
// per-plan upload of what the decode kernels (attention_decode.cu) read.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "check.cuh"
#include "cuda/decode_plan.cuh"
#include "cuda/launch_checks.hpp"
#include "ksa/cuda_cache.hpp"
#include "ksa/error.hpp"

namespace ksa::cuda {
namespace {

using namespace detail;

// Slabs in device memory, filled with all-ones bytes (NaN in bf16): a kernel that read a row never written
// would show it.
struct DeviceSlabs final : SlabAllocator {
  explicit DeviceSlabs(cudaStream_t s) : stream(s) {}
  cudaStream_t stream;  // the cache's: every kernel that writes or reads its rows runs there
  void* allocate(int64_t bytes) override {
    void* p = nullptr;
    KSA_CUDA_CHECK(cudaMalloc(&p, size_t(bytes)));
    // The fill is queued on the cache's stream, before any kernel that can write rows of this slab (a slab is
    // taken while work is planned, never inside a graph capture). It used to be a cudaMemset and a device
    // synchronisation per 1 MiB slab: during a long prompt, a wait for the device every few layers.
    const cudaError_t e = cudaMemsetAsync(p, 0xff, size_t(bytes), stream);
    if (e != cudaSuccess) {
      cudaFree(p);
      KSA_CUDA_CHECK(e);
    }
    return p;
  }
  void deallocate(void* p, int64_t) noexcept override { cudaFree(p); }
  bool host_accessible() const override { return false; }
};

// Replaces the buffer (p, cap) by one of at least `bytes` (twice the old capacity at least): free, then
// allocate; (p, cap) stay null/0 if the allocation throws.
template <class Free, class Alloc>
void regrow(void*& p, size_t& cap, size_t bytes, Free free_fn, Alloc alloc_fn) {
  const size_t n = std::max(bytes, cap * 2);
  free_fn(p);
  p = nullptr;
  cap = 0;
  KSA_CUDA_CHECK(alloc_fn(&p, n));
  cap = n;
}

// A device buffer that only grows (growing waits for the stream: the old buffer may still be in use).
struct DeviceBuf {
  void* p = nullptr;
  size_t cap = 0;
  uint64_t generation = 0;  // counts the moves
  void reserve(size_t bytes, cudaStream_t s) {
    if (bytes <= cap) return;
    ++generation;
    KSA_CUDA_CHECK(cudaStreamSynchronize(s));
    regrow(p, cap, bytes, cudaFree, [](void** q, size_t n) { return cudaMalloc(q, n); });
  }
  ~DeviceBuf() { cudaFree(p); }
};

// A pinned host staging buffer; `done` is recorded after the copy that reads it.
struct Staging {
  void* p = nullptr;
  size_t cap = 0;
  cudaEvent_t done = nullptr;
  bool pending = false;
  void wait() {
    if (pending) KSA_CUDA_CHECK(cudaEventSynchronize(done));
    pending = false;
  }
  void reserve(size_t bytes) {
    wait();
    if (bytes > cap) regrow(p, cap, bytes, cudaFreeHost, [](void** q, size_t n) { return cudaMallocHost(q, n); });
  }
  ~Staging() {
    cudaFreeHost(p);
    if (done) cudaEventDestroy(done);
  }
};

size_t align16(size_t x) { return (x + 15) & ~size_t(15); }

void check_tensor(const TensorView& t, const char* name, int64_t rows, int64_t H, int64_t D) {
  if (rows == 0) return;
  if (!t.data) fail("cuda decode: ", name, ": data pointer is null");
  if (H > 1 && t.head_stride < D)
    fail("cuda decode: ", name, ".head_stride must be >= D=", D, " (got ", t.head_stride, ")");
  if (rows > 1 && t.row_stride < (H - 1) * t.head_stride + D)
    fail("cuda decode: ", name, ".row_stride must be >= (H-1)*head_stride + D (got ", t.row_stride, ")");
  std::string why;
  if (!views_aligned16({{name, &t}}, &why)) fail("cuda decode: ", why, " (16-byte chunks are moved)");
  const int64_t last = (rows - 1) * t.row_stride + (H - 1) * t.head_stride + D;
  if (last >= (int64_t(1) << 31))
    fail("cuda decode: ", name, " spans ", last, " elements, over 2^31 (packed rows are int32)");
}

// read_stream: one CTA per row; src[i] is the row's block (K [Hkv, P, D] then V), srow[i] its row in the block
// and dst[i] its stream position; 16 bytes per thread.
__global__ void __launch_bounds__(256)
    read_rows_kernel(const uint16_t* const* __restrict__ src, const int32_t* __restrict__ srow,
                     const int32_t* __restrict__ dst, int P, int Hkv, int D, uint16_t* k, int64_t k_rs, int64_t k_hs,
                     uint16_t* v, int64_t v_rs, int64_t v_hs) {
  const uint16_t* blk = src[blockIdx.x];
  const int r = srow[blockIdx.x];
  const int64_t pos = dst[blockIdx.x];
  const int cpr = D / 8, n = Hkv * cpr;
  for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
    const int kv = i / n, h = (i - kv * n) / cpr, c = i - kv * n - h * cpr;
    const uint16_t* from = blk + (int64_t(kv) * Hkv * P + int64_t(h) * P + r) * D;
    uint16_t* to = kv == 0 ? k + pos * k_rs + h * k_hs : v + pos * v_rs + h * v_hs;
    reinterpret_cast<uint4*>(to)[c] = reinterpret_cast<const uint4*>(from)[c];
  }
}

}  // namespace

bool supports(const KvCacheConfig& c, std::string* why) {
  auto no = [&](const std::string& s) {
    if (why) *why = s;
    return false;
  };
  if (c.dtype != DType::bf16) return no(std::string("dtype: must be bf16 (got ") + dtype_name(c.dtype) + ")");
  if (c.D != 64 && c.D != 128) return no("D: must be 64 or 128 (got " + std::to_string(c.D) + ")");
  if (c.max_text_tokens + c.max_text_tokens / c.spec.chunk_size * c.spec.S >= (int64_t(1) << 31))
    return no("max_text_tokens: the stream must stay below 2^31 rows");
  return true;
}

struct KvReadScratch {
  DeviceBuf buf;
};

std::shared_ptr<KvReadScratch> KvCacheGpu::make_read_scratch() { return std::make_shared<KvReadScratch>(); }

struct KvCacheGpu::Impl {
  KvCache cache;
  cudaStream_t stream;
  KvCacheGpuOptions opt;
  int sms = 0;
  int ctas_per_sm[9] = {};  // attend CTAs per SM by GQA group size (queried on first use)
  std::optional<DecodePlan> plan;
  DecodeRun run;  // the last upload's plan (host copy; its device copy at run_dev)
  const DecodeRun* run_dev = nullptr;
  DecodeTensors run_io;  // plan_decode(..., io): the tensors run() launches with
  int64_t run_rows = 0;  // the last decode plan's rows (launch checks io against them)
  PlanStats stats;
  PackedDecode packed;        // the last plan, packed (its vectors reused from step to step)
  BlockAddresses block_addr;  // the pool's block addresses by id
  // Two plan workspaces: decode plans alternate between them (slot), so that a plan can be uploaded while
  // the launches of the plan before it still read the other. A prefill's writes have a workspace of their
  // own (queued on the cache's stream): their larger plans never move a decode workspace, so the graphs
  // captured around the decode stay valid when prompts come and go.
  DeviceBuf meta[2], write_meta, partials, read_meta;  // read_meta: unless opt.read_scratch
  int slot = 0;  // the last decode plan's workspace (an open plan's: cancel_decode moves it back)
  Staging staging[2], read_staging;
  int next_staging = 0;

  Impl(const KvCacheConfig& cfg, CudaStream s, KvCacheGpuOptions o)
      : cache(cfg, std::make_shared<DeviceSlabs>(static_cast<cudaStream_t>(s))),
        stream(static_cast<cudaStream_t>(s)),
        opt(o) {
    int dev = 0;
    KSA_CUDA_CHECK(cudaGetDevice(&dev));
    KSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    for (Staging& st : staging) KSA_CUDA_CHECK(cudaEventCreateWithFlags(&st.done, cudaEventDisableTiming));
    KSA_CUDA_CHECK(cudaEventCreateWithFlags(&read_staging.done, cudaEventDisableTiming));
  }
  ~Impl() {
    // Nothing queued may outlive the buffers.
    cudaStreamSynchronize(stream);
  }

  // Packs the plan for the decode kernels (pack_decode, decode_plan.cpp), uploads it with one async copy and
  // fills `run`. `write_only`: the plan's rows are a prefill (writes only, filtered by `keep`).
  // The copy is queued on `up` (the cache's stream, or the caller's upload stream: plan_decode_on).
  void upload(const DecodePlan& p, float scale, int64_t Hq, bool write_only,
              const std::function<bool(const DecodeKeys&)>& keep, cudaStream_t up) {
    const KvCacheConfig& cfg = cache.config();
    const int64_t Hkv = cfg.Hkv, D = cfg.D, G = Hq / Hkv;
    int64_t per_wave = 0;  // attend CTAs resident at once per KV head
    if (!write_only) {
      if (ctas_per_sm[G] == 0) ctas_per_sm[G] = std::max(1, attend_ctas_per_sm(int(D), int(G)));
      per_wave = std::max<int64_t>(1, int64_t(sms) * ctas_per_sm[G] / Hkv);
    }
    PackedDecode& pk = packed;
    pack_decode(p, cfg, cache.pool_view(), block_addr, write_only, keep, opt.split_rows, per_wave, pk);

    const size_t bytes = decode_blob(pk, run, nullptr, nullptr);
    const size_t acc_bytes = align16(pk.units.size() * size_t(Hkv * G * D) * 4);
    const size_t part_bytes = std::max<size_t>(acc_bytes + pk.units.size() * size_t(Hkv * G) * 8, 16);
    const int to = write_only ? slot : slot ^ 1;
    DeviceBuf& meta = write_only ? write_meta : this->meta[to];
    Staging& stg = staging[next_staging];
    // Growing a buffer waits for the cache's stream and frees the old one (which waits for the device): a
    // plan made on another stream while the cache's stream runs declines instead, changing nothing.
    if (up != stream && (bytes > meta.cap || part_bytes > partials.cap || bytes > stg.cap))
      fail("KvCacheGpu::plan_decode_on: the plan would grow a workspace (plan it on the cache's stream)");
    meta.reserve(bytes, stream);
    partials.reserve(part_bytes, stream);
    if (!write_only && up == stream) {  // the other slot and staging buffer too: the next plan made ahead fits
      this->meta[to ^ 1].reserve(bytes, stream);
      staging[next_staging ^ 1].reserve(bytes);
    }
    stats = PlanStats{int64_t(pk.units.size()), int64_t(pk.toks.size()), pk.total_keys};
    DecodeRun& a = run;
    a = DecodeRun{};
    a.P = int32_t(cfg.block_rows);
    a.Hkv = int32_t(Hkv);
    a.lay = Layout32(cfg.geometry().layout(cfg.max_text_tokens));
    a.Hq = int32_t(Hq);
    a.G = int32_t(G);
    a.D = int32_t(D);
    a.scale = scale;
    a.part_acc = static_cast<float*>(partials.p);
    a.part_ml = reinterpret_cast<float2*>(static_cast<char*>(partials.p) + acc_bytes);
    next_staging ^= 1;
    stg.reserve(bytes);
    decode_blob(pk, a, static_cast<char*>(meta.p), static_cast<char*>(stg.p));
    run_dev = reinterpret_cast<const DecodeRun*>(meta.p);
    KSA_CUDA_CHECK(cudaMemcpyAsync(meta.p, stg.p, bytes, cudaMemcpyHostToDevice, up));
    KSA_CUDA_CHECK(cudaEventRecord(stg.done, up));
    stg.pending = true;
    slot = to;
  }

  static DecodeTensors tensors(const TensorView* q, const TensorView& k, const TensorView& v, const TensorView* out,
                               float* lse) {
    DecodeTensors t;
    t.k = view_of(k), t.v = view_of(v);
    if (q) t.q = view_of(*q);
    if (out) t.out = view_of(*out);
    t.lse = lse;
    return t;
  }

  // Validates the step's tensors against the last plan (its rows, the heads).
  DecodeTensors checked_tensors(const DecodeIO& io, int64_t rows) const {
    const KvCacheConfig& cfg = cache.config();
    if (io.Hq != run.Hq) fail("cuda decode: io.Hq is ", io.Hq, " but the step was planned for Hq=", run.Hq);
    if (io.dtype != DType::bf16) fail("cuda decode: dtype must be bf16 (got ", dtype_name(io.dtype), ")");
    check_tensor(io.q, "q", rows, io.Hq, cfg.D);
    check_tensor(io.k, "k", rows, cfg.Hkv, cfg.D);
    check_tensor(io.v, "v", rows, cfg.Hkv, cfg.D);
    check_tensor(io.out, "out", rows, io.Hq, cfg.D);
    return tensors(&io.q, io.k, io.v, &io.out, io.lse);
  }

  void check_head_args(int64_t Hq, float scale) const {
    const KvCacheConfig& cfg = cache.config();
    if (Hq < 1 || Hq % cfg.Hkv != 0 || Hq / cfg.Hkv > 8)
      fail("cuda decode: Hq must be Hkv * G with G in 1..8 (Hkv=", cfg.Hkv, ", got Hq=", Hq, ")");
    if (!(scale >= 0.f) || !std::isfinite(scale)) fail("cuda decode: scale must be finite and >= 0 (got ", scale, ")");
  }

  void check_step(std::span<const SeqId> ids, std::span<const int64_t> n_new) const {
    std::string why;
    for (size_t i = 0; i < ids.size() && i < n_new.size(); ++i)
      if (!step_ok(ids[i], n_new[i], &why)) fail(why);
  }

  bool step_ok(SeqId id, int64_t n, std::string* why) const {
    const KvCacheConfig& cfg = cache.config();
    const SeqState st = cache.state(id);
    const StreamGeometry geo = cfg.geometry();
    const int64_t S = geo.S;
    if (n <= 0) return true;
    const StreamCounts end = geo.counts(st.stream_length() + n);
    const int64_t R = cache.text_ring_rows();
    if (R < cfg.max_text_tokens) {
      const int64_t lo = geo.live_text_begin(StreamCounts{st.text_tokens, st.summary_tokens});
      if (end.T - lo > R) {
        if (why)
          *why = "cuda decode: a step of " + std::to_string(n) + " tokens for sequence " + std::to_string(id) +
                 " would overwrite ring rows that its earlier tokens read (" + std::to_string(end.T - lo) +
                 " text rows live, the ring holds " + std::to_string(R) +
                 "): split the step or raise KvCacheConfig::ring_slack_rows";
        return false;
      }
    }
    if (!cfg.stores_summaries() && end.sums > st.summary_tokens && (end.sums - 1) / S > st.summary_tokens / S) {
      if (why)
        *why = "cuda decode: a step of " + std::to_string(n) + " tokens for sequence " + std::to_string(id) +
               " writes summaries of two chunks, and this layer keeps only one chunk's summaries (W*k >= "
               "max_text_tokens): split the step";
      return false;
    }
    return true;
  }
};

KvCacheGpu::KvCacheGpu(const KvCacheConfig& cfg, CudaStream stream, KvCacheGpuOptions opt) {
  cfg.validate();
  std::string why;
  if (!supports(cfg, &why)) fail("KvCacheGpu: ", why);
  impl_ = std::make_unique<Impl>(cfg, stream, opt);
}
KvCacheGpu::~KvCacheGpu() = default;

const KvCacheConfig& KvCacheGpu::config() const { return impl_->cache.config(); }
KvCache& KvCacheGpu::host() { return impl_->cache; }
SeqId KvCacheGpu::add_sequence() { return impl_->cache.add_sequence(); }
void KvCacheGpu::release(SeqId id) { impl_->cache.release(id); }
SeqState KvCacheGpu::state(SeqId id) const { return impl_->cache.state(id); }
bool KvCacheGpu::step_ok(SeqId id, int64_t n, std::string* why) const { return impl_->step_ok(id, n, why); }
KvCacheGpu::PlanStats KvCacheGpu::plan_stats() const { return impl_->stats; }

void KvCacheGpu::prefill(SeqId id, const KvRows& k, const KvRows& v) {
  Impl& m = *impl_;
  const KvCacheConfig& cfg = m.cache.config();
  if (m.plan) fail("KvCacheGpu::prefill: a decode step is planned but not committed or cancelled");
  for (const KvRows* r : {&k, &v}) {
    const char* name = r == &k ? "k" : "v";
    if (r->H != cfg.Hkv || r->D != cfg.D || r->dtype != cfg.dtype)
      fail("KvCacheGpu::prefill: ", name, " must be [n, Hkv=", cfg.Hkv, ", D=", cfg.D, "] ", dtype_name(cfg.dtype));
    check_tensor(TensorView{const_cast<void*>(r->data), 0, r->row_stride, r->head_stride}, name, r->n, r->H, r->D);
  }
  if (k.n != v.n) fail("KvCacheGpu::prefill: k has ", k.n, " rows but v has ", v.n);
  if (k.n == 0) return;
  const SeqState st = m.cache.state(id);
  const StreamGeometry geo = cfg.geometry();
  const int64_t S = geo.S;
  const StreamCounts end = geo.counts(st.stream_length() + k.n);
  // Only rows a later token can still see (as KvCache::prefill): no two of them share a cache place.
  const int64_t lo = geo.live_text_begin(end);
  const int64_t last_chunk = end.sums > 0 ? (end.sums - 1) / S : -1;
  const int64_t s_keep = cfg.stores_summaries() ? 0 : last_chunk * S;
  const SeqId ids[1] = {id};
  const int64_t n[1] = {k.n};
  const DecodePlan plan = m.cache.plan_decode(ids, n);
  try {
    const TensorView kv{const_cast<void*>(k.data), 0, k.row_stride, k.head_stride};
    const TensorView vv{const_cast<void*>(v.data), 0, v.row_stride, v.head_stride};
    m.upload(plan, 1.f, cfg.Hkv, true,
             [&](const DecodeKeys& d) { return d.is_summary ? d.row >= s_keep : d.row >= lo; }, m.stream);
    launch_decode(m.run, m.run_dev, Impl::tensors(nullptr, kv, vv, nullptr, nullptr), m.stream);
  } catch (...) {
    m.cache.cancel_decode(plan);
    throw;
  }
  m.cache.commit_decode(plan);
}

void KvCacheGpu::read_stream(SeqId id, int64_t text_begin, int64_t sum_begin, const TensorView& k,
                             const TensorView& v) {
  Impl& m = *impl_;
  const KvCacheConfig& cfg = m.cache.config();
  const SeqKvView sv = m.cache.view(id);
  const KvPoolView pv = m.cache.pool_view();
  const StreamGeometry geo = cfg.geometry();
  const int64_t S = geo.S, P = cfg.block_rows;
  const int64_t lo = geo.live_text_begin(StreamCounts{sv.T, sv.sums});
  if (text_begin < lo || text_begin > sv.T)
    fail("KvCacheGpu::read_stream: text rows from ", text_begin, ": the cache holds text rows [", lo, ", ", sv.T, ")");
  const int64_t sum_end = cfg.stores_summaries() ? sv.sums : sum_begin;
  if (sum_begin < 0 || sum_begin > sum_end)
    fail("KvCacheGpu::read_stream: summary rows from ", sum_begin, ": the cache holds [0, ", sum_end, ")");
  const int64_t n = (sv.T - text_begin) + (sum_end - sum_begin);
  if (n == 0) return;
  check_tensor(k, "k", sv.T + sv.sums, cfg.Hkv, cfg.D);
  check_tensor(v, "v", sv.T + sv.sums, cfg.Hkv, cfg.D);
  // Host tables: block address, row in block, stream position per row.
  const size_t bytes = size_t(n) * (sizeof(void*) + 8);
  m.read_staging.reserve(bytes);
  char* h = static_cast<char*>(m.read_staging.p);
  auto* src = reinterpret_cast<const void**>(h);
  auto* srow = reinterpret_cast<int32_t*>(h + size_t(n) * sizeof(void*));
  int32_t* dst = srow + n;
  int64_t i = 0;
  for (int64_t t = text_begin; t < sv.T; ++t, ++i) {
    const KvRowRef r = sv.text_row(pv, t);
    src[i] = pv.block(r.block), srow[i] = int32_t(r.row), dst[i] = int32_t(geo.text_position(t));
  }
  for (int64_t s = sum_begin; s < sum_end; ++s, ++i) {
    const KvRowRef r = sv.summary_row(pv, S, s);
    src[i] = pv.block(r.block), srow[i] = int32_t(r.row), dst[i] = int32_t(geo.summary_position(s / S, s % S));
  }
  DeviceBuf& meta = m.opt.read_scratch ? m.opt.read_scratch->buf : m.read_meta;
  meta.reserve(bytes, m.stream);
  KSA_CUDA_CHECK(cudaMemcpyAsync(meta.p, h, bytes, cudaMemcpyHostToDevice, m.stream));
  KSA_CUDA_CHECK(cudaEventRecord(m.read_staging.done, m.stream));
  m.read_staging.pending = true;
  const char* d = static_cast<const char*>(meta.p);
  read_rows_kernel<<<unsigned(n), 256, 0, m.stream>>>(
      reinterpret_cast<const uint16_t* const*>(d), reinterpret_cast<const int32_t*>(d + size_t(n) * sizeof(void*)),
      reinterpret_cast<const int32_t*>(d + size_t(n) * sizeof(void*)) + n, int(P), int(cfg.Hkv), int(cfg.D),
      static_cast<uint16_t*>(k.data), k.row_stride, k.head_stride, static_cast<uint16_t*>(v.data), v.row_stride,
      v.head_stride);
  KSA_CUDA_CHECK(cudaGetLastError());
}

void KvCacheGpu::plan_decode(std::span<const SeqId> ids, std::span<const int64_t> n_new, const DecodeIO& io) {
  Impl& m = *impl_;
  plan_decode(ids, n_new, io.Hq, io.scale);
  try {
    m.run_io = m.checked_tensors(io, m.run_rows);
  } catch (...) {
    cancel_decode();
    throw;
  }
}

void KvCacheGpu::plan_decode(std::span<const SeqId> ids, std::span<const int64_t> n_new, int64_t Hq, float scale) {
  plan_decode_on(impl_->stream, ids, n_new, Hq, scale);
}

void KvCacheGpu::plan_decode_on(CudaStream upload, std::span<const SeqId> ids, std::span<const int64_t> n_new,
                                int64_t Hq, float scale) {
  Impl& m = *impl_;
  if (m.plan) fail("KvCacheGpu::plan_decode: a decode step is planned but not committed or cancelled");
  const KvCacheConfig& cfg = m.cache.config();
  m.check_head_args(Hq, scale);
  m.check_step(ids, n_new);  // also throws for unknown ids
  DecodePlan plan = m.cache.plan_decode(ids, n_new);
  try {
    m.upload(plan, scale != 0.f ? scale : 1.f / std::sqrt(float(cfg.D)), Hq, false,
             [](const DecodeKeys&) { return true; }, static_cast<cudaStream_t>(upload));
  } catch (...) {
    m.cache.cancel_decode(plan);
    throw;
  }
  m.run_rows = plan.rows;
  m.run_io = DecodeTensors{};
  m.plan = std::move(plan);
}

void KvCacheGpu::run() {
  Impl& m = *impl_;
  if (!m.plan) fail("KvCacheGpu::run: no decode step is planned");
  if (!m.run_io.q.p && m.run_rows > 0) fail("KvCacheGpu::run: the step was planned without tensors: use launch(io)");
  launch_decode(m.run, m.run_dev, m.run_io, m.stream);
}

void KvCacheGpu::launch(const DecodeIO& io, int64_t unit_capacity) {
  Impl& m = *impl_;
  if (!m.run_dev || m.run.n_toks == 0) fail("KvCacheGpu::launch: no decode step was planned");
  launch_decode(m.run, m.run_dev, m.checked_tensors(io, m.run_rows), m.stream, unit_capacity);
}

uint64_t KvCacheGpu::workspace_generation() const { return workspace_generation(impl_->slot); }
int KvCacheGpu::workspace_slot() const { return impl_->slot; }
const void* KvCacheGpu::workspace_address(int slot) const { return impl_->meta[slot & 1].p; }
uint64_t KvCacheGpu::workspace_generation(int slot) const {
  return impl_->meta[slot & 1].generation * 2 + uint64_t(slot & 1);
}

int retarget_decode_graph(void* graph, std::span<const void* const> from, std::span<const void* const> to) {
  if (from.size() != to.size())
    fail("retarget_decode_graph: ", from.size(), " addresses to move but ", to.size(), " targets");
  cudaGraph_t g = static_cast<cudaGraph_t>(graph);
  size_t n = 0;
  KSA_CUDA_CHECK(cudaGraphGetNodes(g, nullptr, &n));
  std::vector<cudaGraphNode_t> nodes(n);
  KSA_CUDA_CHECK(cudaGraphGetNodes(g, nodes.data(), &n));
  int changed = 0;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    KSA_CUDA_CHECK(cudaGraphNodeGetType(node, &type));
    if (type != cudaGraphNodeTypeKernel) continue;
    cudaKernelNodeParams p{};
    KSA_CUDA_CHECK(cudaGraphKernelNodeGetParams(node, &p));
    if (!detail::is_decode_kernel(p.func) || !p.kernelParams) continue;
    const void* plan = *static_cast<const void* const*>(p.kernelParams[0]);
    const auto it = std::find(from.begin(), from.end(), plan);
    if (it == from.end()) continue;
    // Every decode kernel takes (const DecodeRun* plan, DecodeTensors io): the node's own argument array is
    // the driver's, so a new one carries the moved plan and the same io.
    const void* moved = to[size_t(it - from.begin())];
    void* args[2] = {&moved, p.kernelParams[1]};
    p.kernelParams = args;
    KSA_CUDA_CHECK(cudaGraphKernelNodeSetParams(node, &p));
    ++changed;
  }
  return changed;
}

void KvCacheGpu::commit_decode() {
  Impl& m = *impl_;
  if (!m.plan) fail("KvCacheGpu::commit_decode: no decode step is planned");
  m.cache.commit_decode(*m.plan);
  m.plan.reset();
}

void KvCacheGpu::cancel_decode() {
  Impl& m = *impl_;
  if (!m.plan) fail("KvCacheGpu::cancel_decode: no decode step is planned");
  m.cache.cancel_decode(*m.plan);
  m.plan.reset();
  m.slot ^= 1;  // every open plan is a decode plan, whose upload moved to the other workspace
  m.run_dev = nullptr;
  m.run = DecodeRun{};
}

}  // namespace ksa::cuda
