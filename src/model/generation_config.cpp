#include "ksa/generation_config.hpp"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/json_input.hpp"
#include "ksa/error.hpp"

namespace ksa {

GenerationConfig load_generation_config(const std::string& dir) {
  GenerationConfig g;
  const std::filesystem::path path = std::filesystem::path(dir) / "generation_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    if (ec && ec != std::errc::no_such_file_or_directory) fail(path.string(), ": ", ec.message());
    return g;
  }
  std::ifstream in(path);
  if (!in) fail(path.string(), ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  const nlohmann::json j = detail::parse_json(ss.str(), path.string());
  if (!j.is_object()) fail(path.string(), ": expected a JSON object");
  g.found = true;
  auto id = [&](const nlohmann::json& v, const char* field) -> int64_t {
    if (!v.is_number_integer())
      fail(path.string(), ": ", field, ": expected an integer token id (got ", detail::json_excerpt(v), ")");
    return v.get<int64_t>();
  };
  if (auto it = j.find("eos_token_id"); it != j.end() && !it->is_null()) {
    if (it->is_array())
      for (const auto& v : *it) g.eos_token_ids.push_back(id(v, "eos_token_id"));
    else g.eos_token_ids.push_back(id(*it, "eos_token_id"));
  }
  if (auto it = j.find("bos_token_id"); it != j.end() && !it->is_null()) g.bos_token_id = id(*it, "bos_token_id");
  auto number = [&](const char* field, std::optional<double>& out) {
    auto it = j.find(field);
    if (it == j.end() || it->is_null()) return;
    if (!it->is_number()) fail(path.string(), ": ", field, ": expected a number (got ", it->dump(), ")");
    out = it->get<double>();
  };
  number("temperature", g.temperature);
  number("top_p", g.top_p);
  number("min_p", g.min_p);
  number("repetition_penalty", g.repetition_penalty);
  if (auto it = j.find("top_k"); it != j.end() && !it->is_null()) {
    if (!it->is_number_integer()) fail(path.string(), ": top_k: expected an integer (got ", it->dump(), ")");
    g.top_k = it->get<int64_t>();
  }
  return g;
}

}  // namespace ksa
