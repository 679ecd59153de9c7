// Shared by the `ksa bench attn` device runners (cmd_bench.cpp: CPU; bench_attn_cuda.cpp: CUDA).
#pragma once
#include <cstdint>
#include <vector>

#include "ksa/dtype.hpp"

namespace ksa::tools {

struct AttnArgs {
  int64_t T, k, S, W, B, Hq, Hkv, D, reps, threads, gemm_n;
  bool bwd, tail, ceiling;
  DType dtype;
  std::vector<int64_t> docs;  // --docs: text tokens of packed documents (CUDA only)
};

// Times ksa::cuda::attention_forward (and the backward with --bwd) with CUDA events on random data and
// checks sampled rows of the forward against the CPU oracle. Defined only in CUDA builds.
int run_attn_cuda(const AttnArgs& a);

}  // namespace ksa::tools
