// enum_name: one way to name the values of the small enums (dtypes, positions, finish reasons, ...).
#pragma once
#include <cstddef>

namespace ksa {

// The name of `e` in `names`, which lists a name for every value in declaration order (0, 1, 2, ...);
// `fallback` for a value past the table (a corrupt or newer value, never a crash).
template <class E, std::size_t N>
constexpr const char* enum_name(E e, const char* const (&names)[N], const char* fallback = "?") {
  const auto i = static_cast<std::size_t>(e);
  return i < N ? names[i] : fallback;
}

}  // namespace ksa
