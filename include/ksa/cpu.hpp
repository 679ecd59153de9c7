// CPU attention: the naive oracle (kept forever) and the optimised kernels.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "ksa/attention.hpp"

namespace ksa::cpu {

// The oracle (docs/design.md: the oracle): plain loops over every key the rule makes visible, double accumulation, a
// full probability row. Reads p.q/p.k/p.v in p.dtype; ignores p.out and p.lse.
struct ReferenceOutput {
  int64_t rows = 0;         // rows computed per batch entry
  std::vector<double> out;  // [B, rows, Hq, D]
  std::vector<double> lse;  // [B, rows, Hq]
};
// rows: stream positions to compute (each in [0, L)); empty = all L rows in order.
ReferenceOutput attention_reference(const AttentionParams& p, std::span<const int64_t> rows = {});

// Analytic backward of the oracle: plain loops, double. Returns dq [B, L, Hq, D], dk and dv [B, L, Hkv, D].
struct ReferenceGrads {
  std::vector<double> dq, dk, dv;
};
ReferenceGrads attention_reference_backward(const AttentionBackwardParams& p);

// Tiled online-softmax forward over only the key tiles of key_spans (see src/cpu/attention_fwd.cpp).
void attention_forward(const AttentionParams& p);
// Backward with the same sparsity; memory O(L*H*D).
void attention_backward(const AttentionBackwardParams& p);

}  // namespace ksa::cpu
