// The CUDA kernels' division by a launch-constant divisor (src/cuda/fast_div.hpp) against the division, on
// the host (the device runs the same arithmetic with __umulhi); the decode tile's rows after one division per
// tile (src/cuda/tile_rows.hpp) against a division per row.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "cuda/fast_div.hpp"
#include "cuda/tile_rows.hpp"

namespace ksa {
namespace {

TEST(FastDiv, EqualsTheDivisionBelowTwoToThe31) {
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 1100; ++d) divisors.push_back(d);
  for (uint64_t d = 1101; d < (uint64_t(1) << 31); d += d / 3 + 1) divisors.push_back(uint32_t(d));
  for (int b = 11; b <= 31; ++b) {  // powers of two and their neighbours
    const uint32_t p = uint32_t(1) << b;
    for (uint32_t d : {p - 1, p, p + 1})
      if (d <= (1u << 31)) divisors.push_back(d);
  }
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> any(0, (1u << 31) - 1);
  int64_t checked = 0;
  for (uint32_t d : divisors) {
    const cuda::FastDiv f(d);
    std::vector<uint32_t> ys;
    for (uint32_t y = 0; y < 4096; ++y) ys.push_back(y);
    for (uint32_t k = 1; k < 64; ++k)  // around the first multiples of d and around 2^31
      for (int64_t e = -2; e <= 2; ++e) {
        const int64_t y = int64_t(k) * d + e;
        if (y >= 0 && y < (int64_t(1) << 31)) ys.push_back(uint32_t(y));
      }
    for (uint32_t y = (1u << 31) - 4096; y < (1u << 31); ++y) ys.push_back(y);
    for (int i = 0; i < 2000; ++i) ys.push_back(any(rng));
    for (uint32_t y : ys) {
      const uint32_t q = f.div(y);
      ASSERT_EQ(q, y / d) << "y = " << y << ", d = " << d;
      ASSERT_EQ(f.mod(y, q), y % d) << "y = " << y << ", d = " << d;
    }
    checked += int64_t(ys.size());
  }
  EXPECT_GT(checked, int64_t(10'000'000));
}

// A tile of 64 keys from storage row y0 on, blocks of P >= 64 rows: the first row's block and row by FastDiv,
// then each key's (block, row) by TileRows, against (y0 + key) / P and % P.
TEST(TileRows, EqualTheDivisionOfEveryRowOfATile) {
  constexpr uint32_t kTile = 64;
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> any(0, (1u << 30) - 1);
  int64_t checked = 0;
  for (uint32_t P : {64u, 65u, 96u, 127u, 128u, 1000u, 4096u}) {
    const cuda::FastDiv by_p(P);
    std::vector<uint32_t> starts;
    for (uint32_t y = 0; y < 3 * P; ++y) starts.push_back(y);  // every offset in a block, three blocks
    for (int i = 0; i < 500; ++i) starts.push_back(any(rng));
    for (uint32_t y0 : starts) {
      const uint32_t b0 = by_p.div(y0);
      const cuda::TileRows rows(by_p.mod(y0, b0), P);
      for (uint32_t key = 0; key < kTile; ++key) {
        const cuda::TileRows::At r = rows.at(key);
        ASSERT_EQ(b0 + (r.next ? 1 : 0), (y0 + key) / P) << "y0 = " << y0 << ", key = " << key << ", P = " << P;
        ASSERT_EQ(r.row, (y0 + key) % P) << "y0 = " << y0 << ", key = " << key << ", P = " << P;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, int64_t(1'000'000));
}

}  // namespace
}  // namespace ksa
