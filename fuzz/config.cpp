// config.json: ksa::ModelConfig::parse on arbitrary text. Checks: only ksa::Error escapes, and an accepted
// config survives the writer's round trip (parse(to_json()) writes the same text again).
#include "fuzz_util.hpp"
#include "ksa/model_config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ksa::fuzz::expect_only_ksa_errors([&] {
    const ksa::ModelConfig c = ksa::ModelConfig::parse(ksa::fuzz::as_text(data, size), "config.json");
    const std::string text = c.to_json();
    const ksa::ModelConfig again = ksa::ModelConfig::parse(text, "config.json (written back)");
    if (again.to_json() != text) std::abort();
    if (c.logits_size() < 1 || c.logits_size() > c.vocab_size) std::abort();
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_spec(i).validate();
  });
  return 0;
}
