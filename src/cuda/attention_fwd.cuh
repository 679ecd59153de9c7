// The CUDA forward's kernel arguments, shared by the portable mma.sync kernel (attention_fwd.cu) and the
// Hopper wgmma kernel (attention_fwd_sm90a.cu). Filled once by attention_forward; kernels take it by value.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "cuda/mma.cuh"
#include "cuda/varlen_plan.hpp"
#include "cuda/views.cuh"
#include "cuda/workspace.cuh"
#include "ksa/spec.hpp"

namespace ksa::cuda::detail {

struct FwdArgs {
  Layout lay;    // packed: k, S and summarize_tail of every stream (T: see stream_args)
  Layout32 l32;  // the same geometry in 32-bit arithmetic for per-row index math
  int64_t W;
  int W32;  // W clamped to int range (any W >= #chunks behaves the same)
  int Hq, G, L, num_qtiles;
  int B;  // batch entries (launch_fwd sets it)
  // The query rows, gathered order: [qa0, qa1) then [qb0, qb1) (a whole stream: [0, L) and nothing).
  int qa0, qa1, qb0, qb1;
  float scale_log2;  // softmax scale * log2(e)
  View q, k, v, out;
  float* lse;
};

// The arguments of one stream of a packed call, as a call on that stream alone would have them: its Layout,
// its length, and the tensors and lse starting at its first row (B = 1, so batch strides do not enter).
template <class T>
__device__ __forceinline__ FwdArgs stream_args(const FwdArgs& a, const varlen::Seq& s) {
  FwdArgs o = a;
  o.lay = Layout(a.lay.chunk_size, a.lay.S, s.l32.T, a.lay.summarize_tail);
  o.l32 = s.l32;
  o.L = s.L;
  o.q = rows_on<T>(a.q, s.row0), o.k = rows_on<T>(a.k, s.row0), o.v = rows_on<T>(a.v, s.row0);
  o.out = rows_on<T>(a.out, s.row0);
  if (a.lse) o.lse = a.lse + int64_t(s.row0) * a.Hq;  // [1, L, Hq]: the stream's rows are contiguous
  return o;
}

// Query tile qt of the launch: rows [g0, g1) of the gathered order (ranges a, then b, in tiles of BQ).
template <int BQ>
__device__ __forceinline__ void query_tile(const FwdArgs& a, int qt, int& g0, int& g1) {
  const int na = (a.qa1 - a.qa0 + BQ - 1) / BQ;
  if (qt < na) {
    g0 = a.qa0 + qt * BQ;
    g1 = min(a.qa1, g0 + BQ);
  } else {
    g0 = a.qb0 + (qt - na) * BQ;
    g1 = min(a.qb1, g0 + BQ);
  }
}

inline int query_tiles(const FwdArgs& a, int BQ) {
  return (a.qa1 - a.qa0 + BQ - 1) / BQ + (a.qb1 - a.qb0 + BQ - 1) / BQ;
}

// The epilogue of one query row g, shared by both kernels: its accumulators o (fragment layout: o[4j + 2hf + e]
// holds column 8j + 2tig + e of row half hf) divided by the row's softmax sum l, written to out in stream
// order, and lse (natural log) from m (running max in log2 units).
template <class T, int D>
__device__ __forceinline__ void store_row(const FwdArgs& a, int b, int h, int g, int tig, int hf, const float* o,
                                          float m, float l) {
  const float inv = 1.f / l;
  const int64_t srow = a.l32.stream_of_gathered(uint32_t(g));
  dev::store_acc_row<T, D>(at<T>(a.out, b, srow, h), o, hf, tig, inv);
  if (a.lse && tig == 0) a.lse[(int64_t(b) * a.L + srow) * a.Hq + h] = dev::lse_of(m, l);
}

// Launches kern<<<(query tiles of K::BQ rows, Hq, B), K::THREADS, K::SMEM>>>(a, {}) (both kernels' grid).
// Packed (`packed` not null, B = 1): kern_packed<<<(work items, Hq, 1), ...>>>(a, tables) over the query tiles
// of every stream (varlen::query_tiles for K::BQ), the streams and the items in a workspace of the launch.
// persistent: a grid of one CTA per SM (or fewer, one per item) instead, each taking the items (query tile,
// head, batch entry) x, x + gridDim.x, ... of the a.num_qtiles * Hq * B. `extra`: further kernel arguments
// after (a, tables), the same for both kernels.
template <class K, class Kernel, class PackedKernel, class... Extra>
void launch_fwd(Kernel kern, PackedKernel kern_packed, const FwdArgs& a, int B, const varlen::Streams* packed,
                cudaStream_t stream, bool persistent = false, const Extra&... extra) {
  FwdArgs args = a;
  args.B = B;
  auto grid = [&](int tiles, int batch) {
    if (!persistent) return dim3(unsigned(tiles), unsigned(a.Hq), unsigned(batch));
    const int64_t items = int64_t(tiles) * a.Hq * batch;
    if (items >= (int64_t(1) << 31))
      fail("ksa::cuda::attention_forward: ", items, " work items (query tiles x heads x batch, over 2^31 - 1)");
    int dev = 0, sms = 0;
    KSA_CUDA_CHECK(cudaGetDevice(&dev));
    KSA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    // Persistent only where every CTA gets many items. CTA x takes items x, x + grid, ... (heaviest first):
    // with few items per CTA that static stride can hand some CTAs one heavy item more than the ideal share,
    // e.g. a 1,024-token prompt piece of the engine (9 query tiles x 32 heads = 288 items on 132 SMs: some
    // CTAs 3 heavy items where 256 heavy items over 132 SMs need 2, +50% for the launch; the 128K prefill
    // went from 7.45 to 8.5 s on the H200). With one CTA per item the hardware hands items to SMs as they
    // free up. From kPersistentRounds items per CTA on, the stride's imbalance is at most 1/8 of the launch.
    constexpr int64_t kPersistentRounds = 8;
    if (items < kPersistentRounds * sms) return dim3(unsigned(items), 1u, 1u);
    return dim3(unsigned(sms), 1u, 1u);
  };
  if (packed) {
    const std::vector<varlen::QueryTile> tiles = varlen::query_tiles(*packed, a.W, K::BQ);
    if (tiles.empty()) return;
    if (tiles.size() >= (size_t(1) << 31))
      fail("ksa::cuda::attention_forward: ", tiles.size(), " query tiles (over 2^31 - 1)");
    HostImage img;
    const size_t o_seqs = img.add(packed->seqs), o_tiles = img.add(tiles);
    Workspace ws(img.size(), stream);
    img.upload(ws.p, stream);
    varlen::Tables tab;
    tab.seqs = HostImage::at<varlen::Seq>(ws.p, o_seqs);
    tab.tiles = HostImage::at<varlen::QueryTile>(ws.p, o_tiles);
    args.num_qtiles = int(tiles.size());
    KSA_CUDA_CHECK(cudaFuncSetAttribute(kern_packed, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
    kern_packed<<<grid(args.num_qtiles, 1), K::THREADS, K::SMEM, stream>>>(args, tab, extra...);
    KSA_CUDA_CHECK_LAUNCH();
    ws.release();
    return;
  }
  KSA_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, K::SMEM));
  args.num_qtiles = query_tiles(a, K::BQ);
  if (args.num_qtiles == 0) return;
  kern<<<grid(args.num_qtiles, B), K::THREADS, K::SMEM, stream>>>(args, varlen::Tables{}, extra...);
  KSA_CUDA_CHECK_LAUNCH();
}

// Launches the wgmma forward for D = 64 or 128 (f16 selects half, else bf16); packed: see launch_fwd. tma: the
// K/V tiles copied by the tensor memory accelerator where the launch allows it (one stream layout whose k and
// S divide the 128-key tile), else by cp.async. Requires sm90a_usable() (launch_checks.hpp).
void launch_fwd_sm90a(const FwdArgs& a, int B, int D, bool f16, const varlen::Streams* packed, bool tma,
                      cudaStream_t stream);

}  // namespace ksa::cuda::detail
