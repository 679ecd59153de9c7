// Typed reads of JSON object fields with errors that name the file, the field and the bad value
// ("DIR/config.json: hidden_size: must be an integer (got \"2560\")"). Private to src/model.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

#include "core/json_input.hpp"  // parse_json (depth and number limits), json_excerpt
#include "ksa/error.hpp"

namespace ksa::detail {

inline std::string read_text_file(const std::string& path, const char* what) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) fail(path, ": is a directory, not ", what);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot open ", what);
  std::ostringstream os;
  os << in.rdbuf();
  if (in.bad()) fail(path, ": read error");
  return os.str();
}

// A JSON object and the name of the file it came from.
class Fields {
 public:
  Fields(const Json& obj, std::string source, std::string prefix = "")
      : obj_(obj), source_(std::move(source)), prefix_(std::move(prefix)) {
    if (!obj_.is_object())
      fail(source_, ": ", prefix_.empty() ? "top level" : prefix_, ": must be a JSON object (got ", json_excerpt(obj_),
           ")");
  }

  // Present and not null.
  bool has(const char* key) const {
    auto it = obj_.find(key);
    return it != obj_.end() && !it->is_null();
  }
  const Json* get(const char* key) const {
    auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  const Json& at(const char* key) const {
    const Json* v = get(key);
    if (!v) fail(source_, ": ", name(key), ": missing (required)");
    return *v;
  }

  [[noreturn]] void bad(const char* key, const char* what, const Json& v) const {
    fail(source_, ": ", name(key), ": must be ", what, " (got ", json_excerpt(v), ")");
  }
  [[noreturn]] void bad_value(const char* key, const std::string& what) const {
    fail(source_, ": ", name(key), ": ", what);
  }

  int64_t integer(const char* key) const { return to_int(key, at(key)); }
  int64_t integer(const char* key, int64_t def) const {
    const Json* v = get(key);
    return v ? to_int(key, *v) : def;
  }
  double number(const char* key, double def) const {
    const Json* v = get(key);
    if (!v) return def;
    if (!v->is_number()) bad(key, "a number", *v);
    return v->get<double>();
  }
  bool boolean(const char* key, bool def) const {
    const Json* v = get(key);
    if (!v) return def;
    if (!v->is_boolean()) bad(key, "true or false", *v);
    return v->get<bool>();
  }
  std::string string(const char* key, const std::string& def) const {
    const Json* v = get(key);
    if (!v) return def;
    if (!v->is_string()) bad(key, "a string", *v);
    return v->get<std::string>();
  }
  int64_t to_int(const char* key, const Json& v) const {
    if (v.is_number_integer()) {
      if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) bad(key, "an integer in range", v);
      return v.get<int64_t>();
    }
    bad(key, "an integer", v);
  }

  std::string name(const char* key) const { return prefix_.empty() ? std::string(key) : prefix_ + "." + key; }
  const std::string& source() const { return source_; }
  const Json& json() const { return obj_; }

 private:
  const Json& obj_;
  std::string source_, prefix_;
};

}  // namespace ksa::detail
