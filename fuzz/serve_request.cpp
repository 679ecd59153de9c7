// `ksa serve` request bodies: the first byte picks the route (chat completions, completions, /tokenize,
// /detokenize), the rest is the HTTP body. Checks: only ksa::serve::ApiError (a 4xx with OpenAI's error
// object) or ksa::Error escapes; the error body is valid JSON; an accepted generate request yields a sampler
// configuration, and its stop strings and prompt ids stay within the documented bounds.
#include <nlohmann/json.hpp>

#include "fuzz_util.hpp"
#include "serve/api.hpp"

namespace {

void check_error(const ksa::serve::ApiError& e) {
  if (e.status() < 400 || e.status() > 599) std::abort();
  const auto j = nlohmann::json::parse(ksa::serve::error_body(e), nullptr, false);
  if (j.is_discarded() || !j.contains("error")) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string_view body = ksa::fuzz::as_text(data + 1, size - 1);
  ksa::fuzz::expect_only_ksa_errors([&] {
    try {
      switch (data[0] % 4) {
        case 0:
        case 1: {
          const auto route = data[0] % 4 == 0 ? ksa::serve::Route::chat : ksa::serve::Route::completions;
          const ksa::serve::GenerateRequest r = ksa::serve::parse_generate_request(body, route);
          if (r.stop.size() > ksa::serve::kMaxStops) std::abort();
          for (const auto& s : r.stop)
            if (s.size() > ksa::serve::kMaxStopBytes) std::abort();
          (void)ksa::serve::sampler_config(r, ksa::serve::SamplingDefaults{}, 1);
          break;
        }
        case 2:
          (void)ksa::serve::parse_tokenize_request(body);
          break;
        default:
          (void)ksa::serve::parse_detokenize_request(body);
          break;
      }
    } catch (const ksa::serve::ApiError& e) {
      check_error(e);
    }
  });
  return 0;
}
