// Generated token ids -> text, released as soon as it is final: only complete UTF-8 characters, and never text
// that may turn out to be the beginning of a stop string. `ksa generate` prints what it releases; `ksa serve`
// sends it as stream deltas, so a streamed and a non-streamed response carry the same text.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ksa/tokenizer.hpp"

namespace ksa {

// Length of the prefix of `bytes` that does not end inside an unfinished UTF-8 character (the rest may be
// completed by the next token's bytes). Invalid bytes count as finished: utf8_replace_invalid handles them.
size_t complete_utf8_prefix(std::string_view bytes);

class TextStream {
 public:
  // `stops`: stop strings (empty ones are ignored). The tokenizer must outlive the stream.
  TextStream(const Tokenizer& tok, std::vector<std::string> stops);

  // Adds one token's bytes and appends the text that is now final to `out`. Returns true when a stop string
  // is complete: the text before it has been released; the stop string and anything after it never are (later
  // pushes release nothing).
  bool push(int32_t id, std::string& out);
  // Releases what is held back (an unfinished character becomes U+FFFD; a partial stop string is plain text).
  void finish(std::string& out);

  bool stopped() const { return stopped_; }
  const std::string& stop_found() const { return stop_found_; }

 private:
  bool drain(bool final, std::string& out);

  const Tokenizer& tok_;
  std::vector<std::string> stops_;
  std::string bytes_;  // bytes of an unfinished character
  std::string text_;   // complete text not released yet
  std::string stop_found_;
  bool stopped_ = false;
};

}  // namespace ksa
