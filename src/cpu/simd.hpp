// Internal: the run-time SIMD target of the CPU kernels (Google Highway's dynamic dispatch, see simd.cpp).
#pragma once
#include <cstdint>
#include <vector>

namespace ksa::cpu::detail {

// The Highway targets compiled into this build that this CPU runs, best first.
std::vector<int64_t> simd_targets();
const char* simd_target_name(int64_t target);
// Tests: restrict the dispatch to one target of simd_targets() (0 restores the automatic choice). Not
// thread-safe with kernels running.
void force_simd_target(int64_t target);

}  // namespace ksa::cpu::detail
