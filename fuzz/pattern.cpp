// Layer patterns (summary_sliding_chunk_num, summary_layer_freq): ksa::parse_int_pattern on arbitrary text.
// Input: one byte choosing the layer count, then the pattern text. Checks: only ksa::Error escapes, and an
// accepted pattern has one value per layer, each in the requested range.
#include "ksa/pattern.hpp"
#include "fuzz_util.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int64_t layers = data[0] == 255 ? 4096 : 1 + data[0] % 64;
  const std::string_view text = ksa::fuzz::as_text(data + 1, size - 1);
  ksa::fuzz::expect_only_ksa_errors([&] {
    const std::vector<int64_t> w = ksa::parse_layer_pattern(text, layers);
    if (int64_t(w.size()) != layers) std::abort();
    for (int64_t x : w)
      if (x < 0 || x > (int64_t(1) << 40)) std::abort();
  });
  ksa::fuzz::expect_only_ksa_errors([&] {
    for (int64_t x : ksa::parse_int_pattern(text, layers, "summary_layer_freq", 0, 1))
      if (x != 0 && x != 1) std::abort();
  });
  return 0;
}
