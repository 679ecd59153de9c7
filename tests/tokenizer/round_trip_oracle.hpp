// What decode(encode(s)) must give for valid UTF-8, shared by the reference test and the encode fuzzer
// (fuzz/tokenizer_encode.cpp): added tokens verbatim (leftmost-longest; the tokenizers there have no
// lstrip/rstrip/single_word flags), the text between them NFC-normalised stretch by stretch (HF normalises
// after splitting off added tokens, so a combining mark right after one does not compose with it).
#pragma once
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>

#include <stdexcept>
#include <string>

#include "ksa/tokenizer.hpp"

namespace ksa::test {

// ICU's NFC of s; throws when ICU fails (never in a working build).
inline std::string nfc(const std::string& s) {
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* n = icu::Normalizer2::getNFCInstance(st);
  std::string out;
  icu::StringByteSink<std::string> sink(&out);
  if (U_SUCCESS(st)) n->normalizeUTF8(0, s, sink, nullptr, st);
  if (U_FAILURE(st)) throw std::runtime_error(std::string("ICU NFC: ") + u_errorName(st));
  return out;
}

inline std::string expected_round_trip(const Tokenizer& tok, const std::string& s) {
  std::string out, seg;
  for (size_t i = 0; i < s.size();) {
    size_t best = 0;
    for (const AddedToken& a : tok.added_tokens())
      if (a.content.size() > best && s.compare(i, a.content.size(), a.content) == 0) best = a.content.size();
    if (best == 0) {
      seg += s[i++];
      continue;
    }
    out += nfc(seg) + s.substr(i, best);
    seg.clear();
    i += best;
  }
  return out + nfc(seg);
}

}  // namespace ksa::test
