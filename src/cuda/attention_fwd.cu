// CUDA forward (sm80+): flash-style tiled attention with tensor cores (mma.sync m16n8k16, bf16/f16 in,
// fp32 accumulate) over only the key tiles that the core's key_spans/KeyTileCursor return.
//
// Rows are processed in the core's gathered order (text rows, then all summaries), so the window is a band
// of text rows and the old summaries one contiguous block of key tiles. The caller's tensors stay in stream
// order: each 16-byte cp.async computes its row's stream position (stream_of_gathered), so a tile of
// summary rows is read as one logical block without a separate gather pass (each row is one D*2-byte run).
//
// On compute capability 9.0 (built with architecture 90) attention_forward runs the wgmma kernel of
// attention_fwd_sm90a.cu instead (KernelOptions::forward_config 0..4 picks one of these for comparison).
//
// Packed sequences (AttentionParams::cu_seqlens), in both kernels: one launch for all streams. The grid walks
// a table of (stream, query tile) work items built on the host from the streams' Layouts and uploaded with
// the launch (varlen_plan.hpp says why a table); each CTA takes its stream's rows, Layout and tile walk
// (detail::stream_args), so it does what a call on that stream alone does for the same tile, with the same
// bits. Each kernel is instantiated twice (PACKED), so that plain calls run the code they ran before.
//
// File shape (docs/design.md: kernel files): traits -> device code -> launcher.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "check.cuh"
#include "cuda/attention_fwd.cuh"
#include "ksa/cache.hpp"
#include "ksa/cuda.hpp"
#include "ksa/error.hpp"
#include "launch_checks.hpp"
#include "mma.cuh"

namespace ksa::cuda {
namespace {

using namespace dev;  // shared device helpers (mma.cuh)

// ---------------------------------------------------------------------------------------------- traits
template <class T_, int D_, int MT_, int NW_, int BK_, bool QREG_, int MINB_>
struct FwdTraits {
  using T = T_;
  static constexpr int D = D_;         // head dim
  static constexpr int MT = MT_;       // 16-row m-tiles per warp
  static constexpr int NW = NW_;       // warps per CTA
  static constexpr int BK = BK_;       // keys per tile
  static constexpr bool QREG = QREG_;  // Q fragments held in registers (else re-read from smem per tile)
  static constexpr int MINB = MINB_;   // CTAs per SM the register budget is sized for
  static constexpr int BQ = 16 * MT * NW;
  static constexpr int THREADS = 32 * NW;
  static constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
  // Q, then two stages of K and V.
  static constexpr int SMEM = (BQ + 4 * BK) * D * 2 + BQ * int(sizeof(RowKeyRanges));
};

using detail::FwdArgs;

// ------------------------------------------------------------------------------------------ device code
// Loads `rows` gathered rows starting at g0 of one head into swizzled smem (zero-fill past `g_end`). Four
// threads share a row (one stream-row computation per thread and tile); each copy instruction reads 64
// contiguous bytes of a row (two whole 32-byte sectors), the threads' chunks interleaved.
template <class K>
__device__ __forceinline__ void load_rows(const FwdArgs& a, uint32_t smem, const void* base, int64_t bstride,
                                          int64_t rstride, int64_t hoff, int g0, int g_end, int rows) {
  using T = typename K::T;
  constexpr int TPR = 4, CPT = K::CHUNKS / TPR;  // threads per row, chunks per thread
  const int c0 = threadIdx.x % TPR;  // chunks c0, c0 + TPR, ...: a row's TPR threads read 64 contiguous bytes
  for (int r = threadIdx.x / TPR; r < rows; r += K::THREADS / TPR) {
    const int g = g0 + r;
    const bool valid = g < g_end;
    const int64_t srow = valid ? int64_t(a.l32.stream_of_gathered(uint32_t(g))) : 0;
    const T* src = static_cast<const T*>(base) + bstride + srow * rstride + hoff;
#pragma unroll
    for (int i = 0; i < CPT; ++i) cp_async16(smem + swz<K::CHUNKS>(r, c0 + i * TPR), src + (c0 + i * TPR) * 8, valid);
  }
}

// One CTA: the query rows [g0, g1) (gathered order of a's stream) of head blockIdx.y, batch entry blockIdx.z.
template <class K>
__device__ __forceinline__ void fwd_cta(const FwdArgs& a, int g0, int g1) {
  using T = typename K::T;
  constexpr int D = K::D, BK = K::BK, BQ = K::BQ, MT = K::MT, CH = K::CHUNKS;
  extern __shared__ __align__(128) uint8_t smem[];
  // Two stages: tile i lives in stage i%2 (K at sK0 + stage*KV, V at sV0 + stage*KV).
  constexpr uint32_t KV = BK * D * 2;
  const uint32_t sQ = smem_u32(smem), sK0 = sQ + BQ * D * 2, sV0 = sK0 + 2 * KV;
  // The CTA's query rows' key ranges (rows past g1 see nothing), read only on masked tiles: in shared memory,
  // not registers (the D = 128 configurations are at their register limit).
  RowKeyRanges* s_rk = reinterpret_cast<RowKeyRanges*>(smem + (BQ + 4 * BK) * D * 2);

  const int h = blockIdx.y, b = blockIdx.z, hk = h / a.G;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;

  KeyTileCursor cur(a.lay, key_spans(a.lay, a.W, g0, g1), BK);
  int64_t tb, te;
  bool masked;
  cur.next(tb, te, masked);  // every valid row sees itself: at least one tile

  load_rows<K>(a, sQ, a.q.p, b * a.q.b, a.q.r, h * a.q.h, g0, g1, BQ);
  load_rows<K>(a, sK0, a.k.p, b * a.k.b, a.k.r, hk * a.k.h, int(tb), int(te), BK);
  load_rows<K>(a, sV0, a.v.p, b * a.v.b, a.v.r, hk * a.v.h, int(tb), int(te), BK);
  cp_async_commit();

  for (int r = threadIdx.x; r < BQ; r += K::THREADS)
    s_rk[r] = g0 + r < g1 ? row_key_ranges(a.l32, a.W32, uint32_t(g0 + r)) : RowKeyRanges{1, 0, 1, 0};

  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];  // m: running max of raw scores times scale_log2
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }

  auto q_frag = [&](int mt, int kk, uint32_t* f) {
    const int r = warp * 16 * MT + mt * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
    const int c = kk * 2 + lane / 16;
    ldsm_x4(f[0], f[1], f[2], f[3], sQ + swz<CH>(r, c));
  };
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[K::QREG ? MT : 1][K::QREG ? D / 16 : 1][4];
  if constexpr (K::QREG) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) q_frag(mt, kk, qf[mt][kk]);
  }

  int stage = 0;
  for (;;) {
    // Prefetch the next tile (K, V) into the other stage while this one is computed.
    int64_t nb_, ne_;
    bool nmasked;
    const bool more = cur.next(nb_, ne_, nmasked);
    if (more) {
      load_rows<K>(a, sK0 + (stage ^ 1) * KV, a.k.p, b * a.k.b, a.k.r, hk * a.k.h, int(nb_), int(ne_), BK);
      load_rows<K>(a, sV0 + (stage ^ 1) * KV, a.v.p, b * a.v.b, a.v.r, hk * a.v.h, int(nb_), int(ne_), BK);
      cp_async_commit();
      cp_async_wait_one();  // this tile's group has landed
    } else {
      cp_async_wait_all();
    }
    __syncthreads();
    const uint32_t sK = sK0 + stage * KV, sV = sV0 + stage * KV;

    float s[MT][BK / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < BK / 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qt_[MT][4];
      if constexpr (!K::QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) q_frag(mt, kk, qt_[mt]);
      }
#pragma unroll
      for (int nb = 0; nb < BK / 16; ++nb) {
        uint32_t b0, b1, b2, b3;
        const int r = nb * 16 + (lane % 8) + 8 * (lane / 16), c = kk * 2 + (lane / 8) % 2;
        ldsm_x4(b0, b1, b2, b3, sK + swz<CH>(r, c));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t* af = K::QREG ? qf[K::QREG ? mt : 0][K::QREG ? kk : 0] : qt_[mt];
          mma16816<T>(s[mt][2 * nb], af, b0, b1);
          mma16816<T>(s[mt][2 * nb + 1], af, b2, b3);
        }
      }
    }

    // Mask (tiles on a span edge, or clipped short: rows past the tile's end lie in no row's key range),
    // then the online softmax in the log2 domain: p = 2^(s * scale_log2 - m).
    const bool need_mask = masked || (te - tb) < BK, text = tb < a.l32.T;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
        const KeyRange kr = need_mask ? key_range(s_rk[warp * 16 * MT + mt * 16 + gid + 8 * hf], text) : KeyRange{};
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[mt][j][2 * hf + e];
            if (need_mask && !kr.sees(int(tb) + j * 8 + 2 * tig + e)) x = -INFINITY;
            mx = fmaxf(mx, x);
          }
        float alpha;
        const float m_use = online_softmax_step(m[mt][hf], quad_max(mx) * a.scale_log2, alpha);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = ex2(fmaf(s[mt][j][2 * hf + e], a.scale_log2, -m_use));
            s[mt][j][2 * hf + e] = p;
            sum += p;
          }
        l[mt][hf] = l[mt][hf] * alpha + sum;  // per-thread partial; summed over the quad at the end
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[mt][j][2 * hf] *= alpha;
          o[mt][j][2 * hf + 1] *= alpha;
        }
      }

      // O += P V, P as A fragments (the C layout of two 16x8 score tiles is the A layout of a 16x16 tile).
#pragma unroll
    for (int kb = 0; kb < BK / 16; ++kb) {
      uint32_t pf[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pf[mt][0] = pack2<T>(s[mt][2 * kb][0], s[mt][2 * kb][1]);
        pf[mt][1] = pack2<T>(s[mt][2 * kb][2], s[mt][2 * kb][3]);
        pf[mt][2] = pack2<T>(s[mt][2 * kb + 1][0], s[mt][2 * kb + 1][1]);
        pf[mt][3] = pack2<T>(s[mt][2 * kb + 1][2], s[mt][2 * kb + 1][3]);
      }
#pragma unroll
      for (int db = 0; db < D / 16; ++db) {
        uint32_t b0, b1, b2, b3;
        const int r = kb * 16 + (lane % 8) + 8 * ((lane / 8) % 2), c = db * 2 + lane / 16;
        ldsm_x4_t(b0, b1, b2, b3, sV + swz<CH>(r, c));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(o[mt][2 * db], pf[mt], b0, b1);
          mma16816<T>(o[mt][2 * db + 1], pf[mt], b2, b3);
        }
      }
    }
    if (!more) break;
    tb = nb_;
    te = ne_;
    masked = nmasked;
    stage ^= 1;
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // Epilogue: normalise, write out (stream order) and lse (natural log).
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float sum = quad_sum(l[mt][hf]);
      const int g = g0 + warp * 16 * MT + mt * 16 + gid + 8 * hf;
      if (g < g1) detail::store_row<T, D>(a, b, h, g, tig, hf, &o[mt][0][0], m[mt][hf], sum);
    }
}

// PACKED: CTA x takes work item v.tiles[x] (a query tile of one stream, with that stream's rows, Layout and
// tile walk); otherwise query tile x of the launch's one layout, the heaviest (most summaries) first.
template <class K, bool PACKED>
__global__ void __launch_bounds__(K::THREADS, K::MINB) fwd_kernel(const FwdArgs a, const varlen::Tables v) {
  if constexpr (PACKED) {
    const varlen::QueryTile w = v.tiles[blockIdx.x];
    fwd_cta<K>(detail::stream_args<typename K::T>(a, v.seqs[w.seq]), w.g0, w.g1);
  } else {
    int g0, g1;
    query_tile<K::BQ>(a, a.num_qtiles - 1 - int(blockIdx.x), g0, g1);
    fwd_cta<K>(a, g0, g1);
  }
}

// --------------------------------------------------------------------------------------------- launcher
template <class K>
void launch(const FwdArgs& a, int B, const varlen::Streams* packed, cudaStream_t stream) {
  detail::launch_fwd<K>(fwd_kernel<K, false>, fwd_kernel<K, true>, a, B, packed, stream);
}

// Tile configurations (MT m-tiles per warp, NW warps, BK keys); KernelOptions::forward_config picks one for
// tuning and tests (pick_forward below chooses by default).
// Config 5 is the sm_90a wgmma kernel (attention_fwd_sm90a.cu), the default wherever it runs, its K/V tiles
// copied by TMA where the launch allows it; config 6 the same kernel with every tile copied by cp.async.
constexpr int kSm90aConfig = 5, kSm90aCpAsyncConfig = 6;

template <class T, int D>
void dispatch_config(int config, const FwdArgs& a, int B, const varlen::Streams* pk, cudaStream_t s) {
  // The portable configurations, by number.
  static constexpr decltype(&launch<FwdTraits<T, D, 1, 8, 64, true, 1>>) kPortable[kSm90aConfig] = {
      launch<FwdTraits<T, D, 1, 8, 64, true, 1>>,   // 0: 128 rows, 8 warps x 16 rows
      launch<FwdTraits<T, D, 1, 8, 32, false, 2>>,  // 1: 2 CTAs x 8 warps, Q from smem
      launch<FwdTraits<T, D, 1, 4, 64, true, 2>>,   // 2: 64 rows, 2 CTAs x 4 warps
      launch<FwdTraits<T, D, 1, 4, 32, false, 4>>,  // 3: 64 rows, 4 CTAs x 4 warps
      launch<FwdTraits<T, D, 2, 4, 32, false, 2>>,  // 4: 128 rows, 4 warps x 32 rows
  };
  if (config >= 0 && config < kSm90aConfig) return kPortable[config](a, B, pk, s);
  if (config != kSm90aConfig && config != kSm90aCpAsyncConfig)
    fail("ksa::cuda::attention_forward: unknown configuration ", config, " (0..6)");  // pick_forward checked
#if defined(KSA_HAVE_SM90A)
  detail::launch_fwd_sm90a(a, B, D, std::is_same_v<T, __half>, pk, config == kSm90aConfig, s);
#endif
}

template <class T>
void dispatch_dim(int config, const FwdArgs& a, int64_t D, int B, const varlen::Streams* pk, cudaStream_t s) {
  if (D == 128) dispatch_config<T, 128>(config, a, B, pk, s);
  else if (D == 64) dispatch_config<T, 64>(config, a, B, pk, s);
  else fail("ksa::cuda::attention_forward: D=", D, " is not supported (64 or 128)");
}

}  // namespace

bool detail::sm90a_usable() {
#if defined(KSA_HAVE_SM90A)
  return compute_capability() == 90;  // sm_90a code runs on 9.0 only
#else
  return false;
#endif
}

// Why options o cannot run at all (empty: they can).
static std::string forward_config_problem(const KernelOptions& o) {
  if (o.forward_config < -1 || o.forward_config > kSm90aCpAsyncConfig)
    return "forward_config: must be -1 (automatic) or 0..6 (got " + std::to_string(o.forward_config) + ")";
  if (o.forward_config >= kSm90aConfig) {
    const std::string c = std::to_string(o.forward_config);
    if (device_count() == 0) return "forward_config: " + c + ", the sm_90a kernel, needs a CUDA device (none visible)";
    if (!detail::sm90a_usable())
      return "forward_config: " + c +
             ", the sm_90a kernel, needs a compute capability 9.0 device and a build with CUDA "
             "architecture 90 (this device: " +
             device_description() + ")";
  }
  return {};
}

int pick_forward(int64_t D, const KernelOptions& o) {
  if (const std::string why = forward_config_problem(o); !why.empty()) fail("ksa::cuda::attention_forward: ", why);
  if (o.forward_config >= 0) return o.forward_config;
  if (detail::sm90a_usable()) return kSm90aConfig;
  return D == 64 ? 3 : 1;
}

bool supports(const AttentionParams& p, std::string* why, const KernelOptions& o) {
  auto no = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  if (const std::string w = forward_config_problem(o); !w.empty()) return no(w);
  if (p.dtype != DType::bf16 && p.dtype != DType::f16)
    return no(std::string("dtype: must be bf16 or f16 (got ") + dtype_name(p.dtype) + ")");
  if (p.D != 64 && p.D != 128) return no("D: must be 64 or 128 (got " + std::to_string(p.D) + ")");
  if (p.L() >= (int64_t(1) << 31)) return no("L: must be < 2^31 (got " + std::to_string(p.L()) + ")");
  if (p.packed()) {  // every stream's rows rounded up to 128 (varlen_plan.hpp) in 32-bit indices
    if (p.num_seqs >= (int64_t(1) << 31))
      return no("num_seqs: must be < 2^31 (got " + std::to_string(p.num_seqs) + ")");
    const int64_t Lp = varlen::padded_rows(p);
    if (Lp + varlen::kRowBlock >= (int64_t(1) << 31))
      return no("cu_seqlens: the streams' rows, each rounded up to 128, must total < 2^31 - 128 (got " +
                std::to_string(Lp) + ")");
  }
  return detail::views_aligned16({{"q", &p.q}, {"k", &p.k}, {"v", &p.v}, {"out", &p.out}}, why);
}

void attention_forward(const AttentionParams& p, CudaStream stream, const KernelOptions& o) {
  validate(p);
  std::string why;
  if (!supports(p, &why, o)) fail("ksa::cuda::attention_forward: unsupported: ", why);
  const int config = pick_forward(p.D, o);
  if (p.L() == 0) return;
  FwdArgs a{};
  // Packed: the streams' common k, S and tail; each CTA takes its stream's T from the work table.
  a.lay = p.packed() ? Layout(p.layout.chunk_size, p.layout.S, 0, p.layout.summarize_tail) : p.layout;
  a.l32 = Layout32(a.lay);
  a.W = p.W;
  a.W32 = detail::window32(p.W);
  a.Hq = int(p.Hq);
  a.G = int(p.group());
  a.L = int(p.L());
  if (p.packed()) {  // the work table holds the query tiles
    a.qa0 = 0, a.qa1 = a.L, a.qb0 = a.qb1 = a.L;
  } else {  // the query rows: text rows from the q_begin's text count on, then summary rows from its summary count
    const int64_t text_before = p.layout.text_before(p.q_begin);  // also right inside a tail chunk's summaries
    a.qa0 = int(text_before);
    a.qa1 = int(p.layout.T);
    a.qb0 = int(p.layout.T + p.q_begin - text_before);
    a.qb1 = a.L;
    if (p.q_begin == 0) a.qa0 = 0, a.qa1 = a.L, a.qb0 = a.qb1 = a.L;  // one range: the tiles as ever
  }
  a.scale_log2 = p.softmax_scale() * dev::kLog2e;
  a.q = detail::view_of(p.q), a.k = detail::view_of(p.k), a.v = detail::view_of(p.v), a.out = detail::view_of(p.out);
  a.lse = p.lse;
  const varlen::Streams streams = p.packed() ? varlen::streams_of(p) : varlen::Streams{};
  const varlen::Streams* pk = p.packed() ? &streams : nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::bf16) dispatch_dim<__nv_bfloat16>(config, a, p.D, int(p.B), pk, s);
  else dispatch_dim<__half>(config, a, p.D, int(p.B), pk, s);
}

}  // namespace ksa::cuda
