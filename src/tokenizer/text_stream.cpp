#include "ksa/text_stream.hpp"

#include <algorithm>

namespace ksa {

TextStream::TextStream(const Tokenizer& tok, std::vector<std::string> stops) : tok_(tok) {
  for (std::string& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

bool TextStream::push(int32_t id, std::string& out) {
  if (stopped_) return true;
  bytes_ += tok_.decode_bytes(std::span<const int32_t>(&id, 1));
  const size_t cut = complete_utf8_prefix(bytes_);
  text_ += utf8_replace_invalid(std::string_view(bytes_).substr(0, cut));
  bytes_.erase(0, cut);
  return drain(false, out);
}

void TextStream::finish(std::string& out) {
  if (stopped_) return;
  text_ += utf8_replace_invalid(bytes_);
  bytes_.clear();
  drain(true, out);
}

bool TextStream::drain(bool final, std::string& out) {
  size_t first = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t p = text_.find(s);
    if (p < first) first = p, stop_found_ = s;
  }
  if (first != std::string::npos) {
    out.append(text_, 0, first);
    text_.clear();
    bytes_.clear();
    stopped_ = true;
    return true;
  }
  // Hold back the longest tail that is a proper prefix of a stop string.
  size_t hold = 0;
  if (!final)
    for (const std::string& s : stops_)
      for (size_t len = std::min(s.size() - 1, text_.size()); len > hold; --len)
        if (text_.compare(text_.size() - len, len, s, 0, len) == 0) {
          hold = len;
          break;
        }
  out.append(text_, 0, text_.size() - hold);
  text_.erase(0, text_.size() - hold);
  return false;
}

}  // namespace ksa
