// Running the CPU kernels' checks on each SIMD target (cpu/simd.hpp) compiled in that this CPU runs.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>

#include "cpu/simd.hpp"

namespace ksa::test {

// Restricts the kernels to one SIMD target for a scope.
struct TargetScope {
  explicit TargetScope(int64_t target) { cpu::detail::force_simd_target(target); }
  ~TargetScope() { cpu::detail::force_simd_target(0); }
};

// checks() once per target, restricted to it, with the target's name in failure messages.
template <class F>
void on_every_simd_target(F checks) {
  for (const int64_t t : cpu::detail::simd_targets()) {
    TargetScope scope(t);
    SCOPED_TRACE(cpu::detail::simd_target_name(t));
    checks();
  }
}

}  // namespace ksa::test
