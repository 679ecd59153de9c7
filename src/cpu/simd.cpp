// Run-time choice of the SIMD target (see simd.hpp). Highway picks the best target this CPU supports that was
// compiled in; set_simd_target("portable") restricts it to the lowest compiled one (SCALAR with GCC on x86:
// one lane at a time in plain C++), set_simd_target("<name>") (AVX2, AVX3, SSE4, NEON, ...) to that target (to
// time or check one target on a machine that has a better one). The `ksa` command maps $KSA_CPU_PRIMITIVES
// onto it; the library reads no environment variable.
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

}  // namespace detail

const char* simd_target() { return detail::tile_kernels().name; }

void set_simd_target(std::string_view name) {
  const std::vector<int64_t> ts = detail::simd_targets();
  if (name.empty() || name == "auto") return hwy::SetSupportedTargetsForTest(0);
  if (name == "portable") return hwy::SetSupportedTargetsForTest(ts.back());
  std::string names;
  for (int64_t t : ts) {
    if (name == hwy::TargetName(t)) return hwy::SetSupportedTargetsForTest(t);
    names += std::string(names.empty() ? "" : ", ") + hwy::TargetName(t);
  }
  fail("CPU SIMD target '", std::string(name), "': not a target of this build and CPU (", names, ", portable or auto)");
}

}  // namespace ksa::cpu
