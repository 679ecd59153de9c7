// Internal to the CPU prefill kernels (attention_fwd.cpp, attention_bwd.cpp): the tile primitives with their
// runtime SIMD dispatch, and the per-call gather of q/k/v into fp32 buffers in gathered order.
//
// Why gather once per call: in gathered order (text rows, then summary rows) the window is a band of text
// rows and the old summaries one contiguous block, so every key tile is a contiguous run of rows; the
// gather also converts bf16 to fp32 once (all math is fp32), folds the softmax scale into q, pads D to a
// multiple of 16 with zeros (so the SIMD kernels never need a remainder in D) and packs K (and, for the
// backward, V, Q and dO) into transposed BK-wide panels that the score kernel streams. It costs O(L*H*D)
// memory and time, small against the attention itself.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "ksa/attention.hpp"
#include "ksa/spec.hpp"
#include "cpu/tile_kernels.hpp"

namespace ksa::cpu::detail {

// The fastest primitives this CPU supports (AVX-512 when __builtin_cpu_supports says so, else portable).
const TileKernels& tile_kernels();
const TileKernels& generic_tile_kernels();
// Returns the AVX-512 primitives, or null when this build or CPU lacks them.
const TileKernels* avx512_tile_kernels();
// Tests: force the portable primitives (false restores the automatic choice). Not thread-safe.
void force_generic_tile_kernels(bool on);

// 64-byte aligned fp32 buffer (uninitialised).
struct FloatBuf {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr;
  int64_t size = 0;
  FloatBuf() = default;
  explicit FloatBuf(int64_t n) : size(n) {
    const size_t bytes = ((size_t(n > 0 ? n : 1) * sizeof(float) + 63) / 64) * 64;
    ptr.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!ptr) throw std::bad_alloc();
  }
  float* data() const { return ptr.get(); }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Key tiles of a layout: BK rows on a BK grid within the text rows and within the summary rows (the grid of
// KeyTileCursor). Index: text tiles first, then summary tiles.
struct KeyTileGrid {
  int64_t T = 0, L = 0, ntext = 0, count = 0;
  explicit KeyTileGrid(const Layout& lay)
      : T(lay.T), L(lay.length()), ntext((lay.T + BK - 1) / BK), count(ntext + (lay.length() - lay.T + BK - 1) / BK) {}
  int64_t index_of(int64_t tile_begin) const { return tile_begin < T ? tile_begin / BK : ntext + (tile_begin - T) / BK; }
  int64_t begin(int64_t i) const { return i < ntext ? i * BK : T + (i - ntext) * BK; }
  int64_t end(int64_t i) const {
    const int64_t b = begin(i), r = i < ntext ? T : L;
    return b + BK < r ? b + BK : r;
  }
};

// Large per-call buffers come from a pool kept by the calling thread between calls: fresh multi-MB
// allocations cost the kernel's page zeroing on first touch (measured: a forward at T=8192, 8 heads, D=128
// took 175 ms with fresh buffers, 137 ms pooled). The pool keeps at most kPoolFloats per thread; a buffer
// that would exceed it is allocated for the call only, so a huge call leaves no huge pool behind.
inline constexpr int64_t kPoolFloats = int64_t(128) << 20;  // 512 MiB per calling thread
struct Scratch {
  float* ptr = nullptr;
  FloatBuf owned;  // set when not pooled
  float* data() const { return ptr; }
};
// The calling thread's pooled buffer `slot` (0 <= slot < 16) with room for n floats (contents undefined).
Scratch scratch(int slot, int64_t n);

// One operand in gathered order, fp32, D padded to Dp: rows[b][h][g][Dp] (when asked for) and, when `grid`
// is not none, the transposed 64-row panels panel[b][h][tile][Dp][64] (key tiles of KeyTileGrid, or the
// plain BQ grid for queries; zero beyond the last row).
struct Gathered {
  int64_t H = 0, L = 0, Dp = 0, ntiles = 0;
  Scratch rows, panels;
  const float* row(int64_t b, int64_t h, int64_t g) const { return rows.data() + ((b * H + h) * L + g) * Dp; }
  const float* panel(int64_t b, int64_t h, int64_t tile) const {
    return panels.data() + ((b * H + h) * ntiles + tile) * Dp * 64;
  }
};

enum class PanelGrid { none, key_tiles, query_tiles };
// Reads t ([B, L, H, D] stream order, dtype) into gathered order, times `mul`, into the pool slots 2*slot
// (rows) and 2*slot+1 (panels). Parallel over (b, h).
Gathered gather(const AttentionParams& p, const TensorView& t, int64_t H, float mul, bool need_rows, PanelGrid grid,
                int slot, int threads);

// The token of every gathered row (for the per-element rule on masked tiles: visible_tokens, no division).
std::vector<StreamToken> gathered_tokens(const Layout& lay);

// Applies THE rule to a masked tile: s[r*64 + j] = -inf where query row q0+r does not see key row k0+j.
// `transposed`: rows are keys and columns queries.
void apply_mask(float* s, int rows, int cols, const StreamToken* qtok, const StreamToken* ktok, int64_t W,
                bool transposed);

// OpenMP threads for a call: n > 0 as given, else all available.
int resolve_threads(int n);

}  // namespace ksa::cpu::detail
