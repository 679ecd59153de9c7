// Run-time choice of the SIMD target (see simd.hpp). Highway picks the best target this CPU supports that was
// compiled in; KSA_CPU_PRIMITIVES=portable restricts it to the lowest compiled one (SCALAR with GCC on x86:
// one lane at a time in plain C++), KSA_CPU_PRIMITIVES=<name> (AVX2, AVX3, SSE4, NEON, SVE, ...) to that
// target (to time or check one target on a machine that has a better one).
#include "cpu/simd.hpp"
#include "cpu/tile_kernels.hpp"

#include <cstdlib>
#include <mutex>
#include <string>

#include <hwy/targets.h>

#include "ksa/dense.hpp"
#include "ksa/error.hpp"

namespace ksa::cpu {
namespace detail {

std::vector<int64_t> simd_targets() { return hwy::SupportedAndGeneratedTargets(); }

const char* simd_target_name(int64_t target) { return hwy::TargetName(target); }

void force_simd_target(int64_t target) { hwy::SetSupportedTargetsForTest(target); }

void select_simd_target() {
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("KSA_CPU_PRIMITIVES");
    if (!env || !*env) return;
    const std::vector<int64_t> ts = simd_targets();
    if (std::string(env) == "portable") {
      hwy::SetSupportedTargetsForTest(ts.back());
      return;
    }
    std::string names;
    for (int64_t t : ts) {
      if (std::string(env) == hwy::TargetName(t)) {
        hwy::SetSupportedTargetsForTest(t);
        return;
      }
      names += std::string(names.empty() ? "" : ", ") + hwy::TargetName(t);
    }
    fail("KSA_CPU_PRIMITIVES=", env, ": not a SIMD target of this build and CPU (", names, ", or portable)");
  });
}

}  // namespace detail

const char* simd_target() { return detail::tile_kernels().name; }

}  // namespace ksa::cpu
