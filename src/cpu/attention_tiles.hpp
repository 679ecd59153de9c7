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

#include "cpu/thread_pool.hpp"
#include "cpu/tile_kernels.hpp"
#include "ksa/attention.hpp"
#include "ksa/spec.hpp"

namespace ksa::cpu::detail {

// Tests: force the lowest SIMD target compiled in (simd.hpp; false restores the automatic choice). Not
// thread-safe.
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

// The independent streams of a call, each walked with its own Layout and the core's tiles: the B batch
// entries of a plain call (one Layout), or the packed sequences of a varlen call (B = 1, a Layout each; see
// AttentionParams). The gathered buffers hold segment after segment ([segment][h][g][Dp]); query tiles (the
// BQ grid) and key tiles (KeyTileGrid) are numbered segment after segment too. Work items are
// (segment, head, tile), so no tile crosses a stream boundary and no stream is padded.
struct Segment {
  Layout lay;
  KeyTileGrid grid;          // the core's key tiles of lay, BK rows
  int64_t b = 0, row0 = 0;   // batch entry and first stream row in the tensors
  int64_t L = 0, nqt = 0;    // rows and query tiles
  int64_t g0 = 0;            // first gathered row (sum of the L of earlier segments)
  int64_t qt0 = 0, kt0 = 0;  // first query tile and first key tile in the call's numbering
  // Offsets of the per-layout tables (gathered_tokens, the backward's inverse walk): segments of one plain
  // call share their Layout and so one table at 0; packed sequences have their own at g0 and kt0.
  int64_t tok0 = 0, ref0 = 0;
  explicit Segment(const Layout& l) : lay(l), grid(l, BK) {}
};
struct Segments {
  std::vector<Segment> seg;
  int64_t rows = 0, qtiles = 0, ktiles = 0;  // totals over the segments
  explicit Segments(const AttentionParams& p);
  // The segment holding call-wide query tile qt / key tile kt.
  const Segment& of_query_tile(int64_t qt) const;
  const Segment& of_key_tile(int64_t kt) const;
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

enum class PanelGrid { none, key_tiles, query_tiles };

// One operand in gathered order, fp32, D padded to Dp: rows[segment][h][g][Dp] (when asked for) and, when
// `grid` is not none, the transposed 64-row panels panel[segment][h][tile][Dp][64] (key tiles of the
// segment's KeyTileGrid, or the plain BQ grid for queries; zero beyond the last row).
struct Gathered {
  int64_t H = 0, Dp = 0;
  PanelGrid grid = PanelGrid::none;
  Scratch rows, panels;
  const float* row(const Segment& s, int64_t h, int64_t g) const { return rows.data() + (s.g0 * H + h * s.L + g) * Dp; }
  const float* panel(const Segment& s, int64_t h, int64_t tile) const {
    const int64_t t0 = grid == PanelGrid::key_tiles ? s.kt0 : s.qt0;
    const int64_t n = grid == PanelGrid::key_tiles ? s.grid.count : s.nqt;
    return panels.data() + (t0 * H + h * n + tile) * Dp * 64;
  }
};

// Reads t ([B, L, H, D] stream order, dtype) into gathered order, times `mul`, into the pool slots 2*slot
// (rows) and 2*slot+1 (panels). Stream rows before `first_row` are not read and gather as zeros (q and dout
// of a call with AttentionParams::q_begin). Parallel over (segment, h, 64-row block).
Gathered gather(const AttentionParams& p, const Segments& segs, const TensorView& t, int64_t H, float mul,
                bool need_rows, PanelGrid grid, int slot, int threads, int64_t first_row = 0);

// The query rows a call computes (AttentionParams::q_begin), in gathered order: the text rows from the number
// of text rows before q_begin on, and the summary rows from the number of summaries before it on. Rows of
// query tiles outside them are neither read (they gather as zeros) nor written; a tile without one is skipped.
struct QueryRows {
  int64_t T = 0, text0 = 0, sum0 = 0;  // computed: gathered g in [text0, T) or g >= sum0
  QueryRows(const Layout& lay, int64_t q_begin);
  bool has(int64_t g) const { return g < T ? g >= text0 : g >= sum0; }
  bool any(int64_t g0, int64_t g1) const { return (g0 < T && text0 < g1 && text0 < T) || sum0 < g1; }
};

// The token of every gathered row (for the per-element rule on masked tiles: visible_tokens, no division):
// of one layout, or of every segment's table (row tok0 + g of segment s is its gathered row g).
std::vector<StreamToken> gathered_tokens(const Layout& lay);
std::vector<StreamToken> gathered_tokens(const Segments& segs);

// Applies THE rule to a masked tile: s[r*64 + j] = -inf where query row q0+r does not see key row k0+j.
// `transposed`: rows are keys and columns queries.
void apply_mask(float* s, int rows, int cols, const StreamToken* qtok, const StreamToken* ktok, int64_t W,
                bool transposed);

}  // namespace ksa::cpu::detail
