// Host-side checks and argument conversions shared by the CUDA launchers (forward, backward).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "ksa/attention.hpp"

namespace ksa::cuda::detail {

// The kernels move 16-byte chunks of 2-byte elements: every view's base and strides must be 16-byte aligned.
// Returns false and names the first offending view in `why`.
inline bool views_aligned16(std::initializer_list<std::pair<const char*, const TensorView*>> views, std::string* why) {
  for (const auto& [name, t] : views) {
    const bool ok = (reinterpret_cast<uintptr_t>(t->data) & 15) == 0 && t->row_stride % 8 == 0 &&
                    t->head_stride % 8 == 0 && t->batch_stride % 8 == 0;
    if (!ok) {
      if (why) *why = std::string(name) + ": data and strides must be 16-byte aligned";
      return false;
    }
  }
  return true;
}

// Compute capability of the current device as 10 * major + minor (90 for an H100/H200), cached per device
// (devices past the first 64 are asked each time). Defined in device.cu.
int compute_capability();

// Whether this build has the sm_90a kernels (KSA_HAVE_SM90A) and the current device runs them (compute
// capability 9.0). Defined in attention_fwd.cu.
bool sm90a_usable();

// The window for 32-bit chunk arithmetic: any W >= the number of chunks behaves the same, so clamp.
inline int window32(int64_t W) { return int(W < (int64_t(1) << 30) ? W : (int64_t(1) << 30)); }

}  // namespace ksa::cuda::detail
