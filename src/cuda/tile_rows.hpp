// The cache rows of one decode tile when they are consecutive storage rows and a block holds at least a tile
// (the attend kernel's `contig` case, src/cuda/attention_decode.cu): the tile's first row is row r0 of some
// block, so key `key` (< P) is row r0 + key of that block or row r0 + key - P of the next one. Plain C++
// (KSA_HD) so that a CPU test (tests/cuda_host/fast_div_test.cpp) checks it against the division by P.
#pragma once
#include <cstdint>

#include "ksa/config.hpp"

namespace ksa::cuda {

struct TileRows {
  uint32_t r0 = 0, P = 1;  // r0 < P
  struct At {
    uint32_t row;  // the row in its block
    bool next;     // in the block after the first row's
  };

  TileRows() = default;
  KSA_HD TileRows(uint32_t first_row, uint32_t rows_per_block) : r0(first_row), P(rows_per_block) {}
  // key < P.
  KSA_HD At at(uint32_t key) const {
    const uint32_t r = r0 + key;
    const bool n = r >= P;
    return {n ? r - P : r, n};
  }
};

}  // namespace ksa::cuda
