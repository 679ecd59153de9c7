// ksa::cuda::KvCacheGpu (include/ksa/cuda_cache.hpp): ksa::KvCache's bookkeeping over device slabs, and the
// per-plan upload of what the decode kernels (attention_decode.cu) read.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "cache/decode_keys.hpp"
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
  void* allocate(int64_t bytes) override {
    void* p = nullptr;
    KSA_CUDA_CHECK(cudaMalloc(&p, size_t(bytes)));
    // Synchronous fill: it must land before any kernel, on any stream, writes rows of this slab.
    cudaError_t e = cudaMemset(p, 0xff, size_t(bytes));
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
      cudaFree(p);
      KSA_CUDA_CHECK(e);
    }
    return p;
  }
  void deallocate(void* p, int64_t) noexcept override { cudaFree(p); }
  bool host_accessible() const override { return false; }
};

// A device buffer that only grows (growing waits for the stream: the old buffer may still be in use).
struct DeviceBuf {
  void* p = nullptr;
  size_t cap = 0;
  uint64_t generation = 0;  // counts the moves
  void reserve(size_t bytes, cudaStream_t s) {
    if (bytes <= cap) return;
    ++generation;
    KSA_CUDA_CHECK(cudaStreamSynchronize(s));
    const size_t n = std::max(bytes, cap * 2);
    cudaFree(p);
    p = nullptr;
    cap = 0;
    KSA_CUDA_CHECK(cudaMalloc(&p, n));
    cap = n;
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
    if (bytes <= cap) return;
    const size_t n = std::max(bytes, cap * 2);
    cudaFreeHost(p);
    p = nullptr;
    cap = 0;
    KSA_CUDA_CHECK(cudaMallocHost(&p, n));
    cap = n;
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
  if (c.max_text_tokens + c.max_text_tokens / c.spec.k * c.spec.S >= (int64_t(1) << 31))
    return no("max_text_tokens: the stream must stay below 2^31 rows");
  return true;
}

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
  DeviceBuf meta, partials, read_meta;
  Staging staging[2], read_staging;
  int next_staging = 0;

  Impl(const KvCacheConfig& cfg, CudaStream s, KvCacheGpuOptions o)
      : cache(cfg, std::make_shared<DeviceSlabs>()), stream(static_cast<cudaStream_t>(s)), opt(o) {
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

  // Builds the blob (sequences, tokens, units, writes, block addresses), uploads it with one async
  // copy and fills `run`. `write_only`: the plan's rows are a prefill (writes only, filtered by `keep`).
  template <class Keep>
  void upload(const DecodePlan& p, float scale, int64_t Hq, bool write_only, Keep&& keep) {
    const KvCacheConfig& cfg = cache.config();
    const int64_t Kk = p.k, S = p.S, W = p.W, P = cfg.block_rows, Hkv = cfg.Hkv, D = cfg.D, G = Hq / Hkv;
    const bool stored = cfg.stores_summaries();
    std::vector<DecSeq> seqs(p.seqs.size());
    std::vector<int32_t> tables;  // block ids (resolved to device addresses below)
    std::vector<DecTok> toks;
    std::vector<DecUnit> units;
    std::vector<DecWrite> writes;
    struct Range {
      int32_t tok, seq, summary, begin, end, new_begin, src_off;
    };
    std::vector<Range> ranges;
    int64_t total_keys = 0;
    for (size_t b = 0; b < p.seqs.size(); ++b) {
      const DecodeSeq& sq = p.seqs[b];
      const StreamCounts end = stream_counts(Kk, S, sq.kv.T + sq.kv.sums + sq.n);
      DecSeq& ds = seqs[b];
      ds.text_off = int32_t(tables.size());
      ds.slots = int32_t(sq.kv.text_slots);
      tables.insert(tables.end(), sq.kv.text_blocks, sq.kv.text_blocks + sq.kv.text_slots);
      ds.sum_off = int32_t(tables.size());
      ds.stored = stored ? 1 : 0;
      const int64_t sum_rows = end.sums == 0 ? 0 : (stored ? end.sums : S);
      tables.insert(tables.end(), sq.kv.summary_blocks, sq.kv.summary_blocks + (sum_rows + P - 1) / P);
      const int64_t pos0 = sq.kv.T + sq.kv.sums;
      for (int64_t i = 0; i < sq.n; ++i) {
        const ksa::detail::DecodeKeys keys = ksa::detail::decode_keys(Kk, S, W, pos0 + i);
        const int32_t src = int32_t(sq.row0 + i);
        if (keep(keys)) writes.push_back(DecWrite{src, int32_t(b), keys.is_summary ? 1 : 0, int32_t(keys.row)});
        if (write_only) continue;
        const int32_t t = int32_t(toks.size());
        toks.push_back(DecTok{src, 0, 0, 0});
        for (int r = 0; r < keys.n; ++r) {
          // Rows of this step (text rows from T, summary rows from sums at the step's start) come from the
          // step's k/v: packed row row0 + (stream position - pos0).
          const bool sum = keys.range[r].summary;
          ranges.push_back(Range{t, int32_t(b), sum ? 1 : 0, int32_t(keys.range[r].begin), int32_t(keys.range[r].end),
                                 int32_t(sum ? sq.kv.sums : sq.kv.T), int32_t(sq.row0 - pos0)});
          total_keys += keys.range[r].end - keys.range[r].begin;
        }
      }
    }
    // Split: units of whole attend tiles, sized so that the units of all KV heads fill whole waves of the
    // device (CTAs resident at once = SMs x attend CTAs per SM), at most ~2048 keys per unit and at least two
    // tiles: a unit's fixed costs (its descriptor and block-table loads, the warps' join, a partial per head
    // that the merge reads) outweigh the CTA slot a one-tile unit fills (H200, B=1, T=16K: 24 units of 128
    // keys 16.74 us against 47 of 64 keys 17.57 us, one run each).
    int64_t split = opt.split_rows;
    if (split <= 0 && !write_only) {
      const int64_t tile = attend_tile_keys();
      if (ctas_per_sm[G] == 0) ctas_per_sm[G] = std::max(1, attend_ctas_per_sm(int(D), int(G)));
      const int64_t per_wave = std::max<int64_t>(1, int64_t(sms) * ctas_per_sm[G] / Hkv);
      const int64_t waves = std::max<int64_t>(1, (total_keys + per_wave * 2048 - 1) / (per_wave * 2048));
      split = (total_keys + per_wave * waves - 1) / (per_wave * waves);
      split = std::max<int64_t>(2 * tile, (split + tile - 1) / tile * tile);
    }
    if (split <= 0) split = 2048;
    // A unit's block list must fit the attend kernel's (kMaxUnitBlocks, decode_plan.cuh; only tiny blocks bind).
    split = std::min<int64_t>(split, std::max<int64_t>(attend_tile_keys(), (kMaxUnitBlocks - 1) * P));
    std::vector<int32_t> unit_tables;  // per unit, indices into `tables` of the blocks it reads (blk0, ...)
    std::vector<int32_t> unit_nblk;
    for (const Range& r : ranges) {
      DecTok& t = toks[size_t(r.tok)];
      if (t.units == 0) t.unit0 = int32_t(units.size());
      for (int64_t b = r.begin; b < r.end; b += split) {
        DecUnit u;
        u.tok = r.tok, u.seq = r.seq, u.summary = r.summary, u.begin = int32_t(b);
        u.end = int32_t(std::min<int64_t>(r.end, b + split));
        u.qrow = t.row;
        u.sq = seqs[size_t(r.seq)];
        u.new_begin = r.new_begin;
        u.src_off = r.src_off;
        // The blocks of the cache rows it reads, [begin, min(end, new_begin)), by storage row.
        const int64_t rend = std::min<int64_t>(u.end, u.new_begin);
        const DecSeq& ds = seqs[size_t(r.seq)];
        auto storage_row = [&](int64_t x) { return r.summary && !ds.stored ? x % S : x; };
        int32_t nb = 0;
        if (rend > u.begin) {
          const int64_t y0 = storage_row(u.begin), y1 = storage_row(rend - 1);
          if (y1 - y0 != rend - 1 - u.begin)  // one chunk's summaries when they are not stored (KvCache)
            fail("cuda decode: internal error: a unit's cache rows are not contiguous (rows ", u.begin, "..", rend,
                 ")");
          u.blk0 = int32_t(y0 / P);
          nb = int32_t(y1 / P - y0 / P + 1);
          for (int64_t b = y0 / P; b <= y1 / P; ++b)
            unit_tables.push_back(r.summary ? ds.sum_off + int32_t(b) : ds.text_off + int32_t(b % ds.slots));
        }
        unit_nblk.push_back(nb);
        units.push_back(u);
        ++t.units;
      }
    }
    stats = PlanStats{int64_t(units.size()), int64_t(toks.size()), total_keys};

    // Blob: seqs, toks, units, writes, block addresses, per-unit block addresses (16-byte aligned sections).
    const KvPoolView pv = cache.pool_view();
    std::vector<const void*> addr(tables.size());
    for (size_t i = 0; i < tables.size(); ++i) addr[i] = tables[i] < 0 ? nullptr : pv.block(tables[i]);
    const int32_t ub_stride =
        unit_nblk.empty() ? 1 : std::max(1, *std::max_element(unit_nblk.begin(), unit_nblk.end()));
    if (ub_stride > kMaxUnitBlocks) fail("cuda decode: internal error: a unit reads ", ub_stride, " blocks");
    std::vector<const void*> uaddr(units.size() * size_t(ub_stride), nullptr);
    for (size_t u = 0, j = 0; u < units.size(); ++u)
      for (int32_t i = 0; i < unit_nblk[u]; ++i)
        uaddr[u * size_t(ub_stride) + size_t(i)] = addr[size_t(unit_tables[j++])];
    size_t off = 0;
    auto section = [&](size_t bytes) {
      const size_t o = off;
      off = align16(off + bytes);
      return o;
    };
    const size_t o_run = section(sizeof(DecodeRun)), o_seqs = section(seqs.size() * sizeof(DecSeq)),
                 o_toks = section(toks.size() * sizeof(DecTok)), o_units = section(units.size() * sizeof(DecUnit)),
                 o_writes = section(writes.size() * sizeof(DecWrite)), o_tables = section(addr.size() * sizeof(void*)),
                 o_ublocks = section(uaddr.size() * sizeof(void*));
    const size_t bytes = off;
    meta.reserve(bytes, stream);
    const size_t part_bytes = align16(units.size() * size_t(Hkv * G * D) * 4) + units.size() * size_t(Hkv * G) * 8;
    partials.reserve(std::max<size_t>(part_bytes, 16), stream);

    char* d = static_cast<char*>(meta.p);
    DecodeRun& a = run;
    a = DecodeRun{};
    a.P = int32_t(P);
    a.Hkv = int32_t(Hkv);
    a.lay = Layout32(Layout(Kk, S, cfg.max_text_tokens));
    a.blocks = reinterpret_cast<const uint16_t* const*>(d + o_tables);
    a.unit_blocks = reinterpret_cast<const uint16_t* const*>(d + o_ublocks);
    a.unit_blocks_stride = ub_stride;
    a.seqs = reinterpret_cast<const DecSeq*>(d + o_seqs);
    a.toks = reinterpret_cast<const DecTok*>(d + o_toks);
    a.units = reinterpret_cast<const DecUnit*>(d + o_units);
    a.writes = reinterpret_cast<const DecWrite*>(d + o_writes);
    a.n_writes = int32_t(writes.size());
    a.n_toks = int32_t(toks.size());
    a.n_units = int32_t(units.size());
    a.Hq = int32_t(Hq);
    a.G = int32_t(G);
    a.D = int32_t(D);
    a.scale = scale;
    a.part_acc = static_cast<float*>(partials.p);
    a.part_ml =
        reinterpret_cast<float2*>(static_cast<char*>(partials.p) + align16(units.size() * size_t(Hkv * G * D) * 4));
    run_dev = reinterpret_cast<const DecodeRun*>(d + o_run);

    Staging& stg = staging[next_staging];
    next_staging ^= 1;
    stg.reserve(bytes);
    char* h = static_cast<char*>(stg.p);
    std::memcpy(h + o_run, &a, sizeof(DecodeRun));
    std::memcpy(h + o_seqs, seqs.data(), seqs.size() * sizeof(DecSeq));
    std::memcpy(h + o_toks, toks.data(), toks.size() * sizeof(DecTok));
    std::memcpy(h + o_units, units.data(), units.size() * sizeof(DecUnit));
    std::memcpy(h + o_writes, writes.data(), writes.size() * sizeof(DecWrite));
    std::memcpy(h + o_tables, addr.data(), addr.size() * sizeof(void*));
    std::memcpy(h + o_ublocks, uaddr.data(), uaddr.size() * sizeof(void*));
    KSA_CUDA_CHECK(cudaMemcpyAsync(meta.p, h, off, cudaMemcpyHostToDevice, stream));
    KSA_CUDA_CHECK(cudaEventRecord(stg.done, stream));
    stg.pending = true;
  }

  static DecodeTensors tensors(const TensorView* q, const TensorView& k, const TensorView& v, const TensorView* out,
                               float* lse) {
    DecodeTensors t;
    t.k = static_cast<const uint16_t*>(k.data);
    t.v = static_cast<const uint16_t*>(v.data);
    t.k_rs = k.row_stride, t.k_hs = k.head_stride, t.v_rs = v.row_stride, t.v_hs = v.head_stride;
    if (q) t.q = static_cast<const uint16_t*>(q->data), t.q_rs = q->row_stride, t.q_hs = q->head_stride;
    if (out) t.out = static_cast<uint16_t*>(out->data), t.o_rs = out->row_stride, t.o_hs = out->head_stride;
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
    const int64_t k = cfg.spec.k, S = cfg.spec.S, W = cfg.spec.W;
    if (n <= 0) return true;
    const StreamCounts end = stream_counts(k, S, st.stream_length() + n);
    const int64_t R = cache.text_ring_rows();
    if (R < cfg.max_text_tokens) {
      const int64_t lo = live_text_begin(k, S, W, st.text_tokens, st.summary_tokens);
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
  const int64_t K = cfg.spec.k, S = cfg.spec.S, W = cfg.spec.W;
  const StreamCounts end = stream_counts(K, S, st.stream_length() + k.n);
  // Only rows a later token can still see (as KvCache::prefill): no two of them share a cache place.
  const int64_t lo = live_text_begin(K, S, W, end.T, end.sums);
  const int64_t last_chunk = end.sums > 0 ? (end.sums - 1) / S : -1;
  const int64_t s_keep = cfg.stores_summaries() ? 0 : last_chunk * S;
  const SeqId ids[1] = {id};
  const int64_t n[1] = {k.n};
  const DecodePlan plan = m.cache.plan_decode(ids, n);
  try {
    const TensorView kv{const_cast<void*>(k.data), 0, k.row_stride, k.head_stride};
    const TensorView vv{const_cast<void*>(v.data), 0, v.row_stride, v.head_stride};
    m.upload(plan, 1.f, cfg.Hkv, true,
             [&](const ksa::detail::DecodeKeys& d) { return d.is_summary ? d.row >= s_keep : d.row >= lo; });
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
  const int64_t K = cfg.spec.k, S = cfg.spec.S, P = cfg.block_rows;
  const int64_t lo = live_text_begin(K, S, cfg.spec.W, sv.T, sv.sums);
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
  const Layout lay(K, S, cfg.max_text_tokens);
  int64_t i = 0;
  for (int64_t t = text_begin; t < sv.T; ++t, ++i) {
    const KvRowRef r = sv.text_row(pv, t);
    src[i] = pv.block(r.block), srow[i] = int32_t(r.row), dst[i] = int32_t(lay.text_to_stream(t));
  }
  for (int64_t s = sum_begin; s < sum_end; ++s, ++i) {
    const KvRowRef r = sv.summary_row(pv, S, s);
    src[i] = pv.block(r.block), srow[i] = int32_t(r.row), dst[i] = int32_t(lay.summary_to_stream(s / S, s % S));
  }
  m.read_meta.reserve(bytes, m.stream);
  KSA_CUDA_CHECK(cudaMemcpyAsync(m.read_meta.p, h, bytes, cudaMemcpyHostToDevice, m.stream));
  KSA_CUDA_CHECK(cudaEventRecord(m.read_staging.done, m.stream));
  m.read_staging.pending = true;
  const char* d = static_cast<const char*>(m.read_meta.p);
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
  Impl& m = *impl_;
  if (m.plan) fail("KvCacheGpu::plan_decode: a decode step is planned but not committed or cancelled");
  const KvCacheConfig& cfg = m.cache.config();
  m.check_head_args(Hq, scale);
  m.check_step(ids, n_new);  // also throws for unknown ids
  DecodePlan plan = m.cache.plan_decode(ids, n_new);
  try {
    m.upload(plan, scale != 0.f ? scale : 1.f / std::sqrt(float(cfg.D)), Hq, false,
             [](const ksa::detail::DecodeKeys&) { return true; });
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
  if (!m.run_io.q && m.run_rows > 0) fail("KvCacheGpu::run: the step was planned without tensors: use launch(io)");
  launch_decode(m.run, m.run_dev, m.run_io, m.stream);
}

void KvCacheGpu::launch(const DecodeIO& io, int64_t unit_capacity) {
  Impl& m = *impl_;
  if (!m.run_dev || m.run.n_toks == 0) fail("KvCacheGpu::launch: no decode step was planned");
  launch_decode(m.run, m.run_dev, m.checked_tensors(io, m.run_rows), m.stream, unit_capacity);
}

uint64_t KvCacheGpu::workspace_generation() const { return impl_->meta.generation; }

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
  m.run_dev = nullptr;
  m.run = DecodeRun{};
}

}  // namespace ksa::cuda
