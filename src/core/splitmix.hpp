// splitmix64: the counter-based hash behind the project's seeded random data (the model writer's weights,
// the tools' random tensors). Element i of a stream seeded with s is splitmix64(s + i * 0x9e37...).
#pragma once
#include <cstdint>

namespace ksa::detail {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace ksa::detail
