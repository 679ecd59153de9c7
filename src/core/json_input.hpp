// The one way ksa reads JSON from files (tokenizer.json, tokenizer_config.json, config.json, safetensors
// headers and index files, generation_config.json): nlohmann's parser behind the limits that keep a hostile
// file from reaching code that is not ready for it. Every failure is a ksa::Error naming the file.
//   - Nesting deeper than kMaxJsonDepth is refused before parsing: nlohmann parses and destroys iteratively,
//     but dump() (error excerpts), copies and comparisons recurse, as do our Sequence loaders.
//   - A number beyond a double (1e309) is nlohmann's out_of_range, not a parse_error: it is caught too.
// Header-only and private to src/; in core so that the layers that read JSON (tokenizer, model, serve) share it
// without depending on each other. core itself does not read JSON nor link nlohmann: whoever includes this
// header links nlohmann itself.
#pragma once
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>

#include "ksa/error.hpp"

namespace ksa::detail {

using Json = nlohmann::json;

// Real files nest a handful of levels (tokenizer.json: 6); 100 keeps every recursion over a value far
// from the stack limit, sanitizers included.
inline constexpr int kMaxJsonDepth = 100;

// The byte offset of the first '[' or '{' nested deeper than max_depth, outside strings; npos when none.
// A linear scan that needs the text to be valid JSON only as far as strings go (an unterminated string
// ends the scan; the parser then reports it).
inline size_t json_too_deep_at(std::string_view text, int max_depth = kMaxJsonDepth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return i;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return std::string_view::npos;
}

// nlohmann's message without its "[json.exception.parse_error.101] " prefix.
inline std::string json_error_text(const Json::exception& e) {
  std::string what = e.what();
  const size_t p = what.find("] ");
  return p == std::string::npos ? what : what.substr(p + 2);
}

// Parses `text`; `source` names the file in errors, which read "<source>: <invalid>: <what went wrong>"
// ("cfg.json: invalid JSON: parse error at line 1, ..."). `callback` as nlohmann's parser_callback_t.
inline Json parse_json(std::string_view text, const std::string& source, const char* invalid = "invalid JSON",
                       const Json::parser_callback_t& callback = nullptr) {
  if (const size_t at = json_too_deep_at(text); at != std::string_view::npos)
    fail(source, ": ", invalid, ": nested deeper than ", kMaxJsonDepth, " levels (at byte ", at, ")");
  try {
    return Json::parse(text.begin(), text.end(), callback);
  } catch (const Json::out_of_range& e) {
    fail(source, ": ", invalid, ": ", json_error_text(e), " (a number must fit in a double)");
  } catch (const Json::exception& e) {
    fail(source, ": ", invalid, ": ", json_error_text(e));
  }
}

// The text of the file `path`, or of the file `name` in it when `path` is a directory; `path` becomes the file
// read, for messages. A path that cannot be stat'ed is left to the open's error.
inline std::string read_json_text(std::string& path, const char* name) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) path = (std::filesystem::path(path) / name).string();
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open ", name);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// The value as it appears in the file, shortened for messages.
inline std::string json_excerpt(const Json& v, size_t max_len = 80) {
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > max_len) s = s.substr(0, max_len - 3) + "...";
  return s;
}

}  // namespace ksa::detail
