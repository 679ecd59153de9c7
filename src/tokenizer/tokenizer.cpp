// Byte-level BPE tokenizer from tokenizer.json (see ksa/tokenizer.hpp).
#include "ksa/tokenizer.hpp"

#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/utext.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <queue>
#include <unordered_map>

#include "core/json_input.hpp"
#include "ksa/error.hpp"
#include "utf8.hpp"

namespace ksa {
namespace {

namespace fs = std::filesystem;
using detail::Json;

std::string excerpt(const Json& v) { return detail::json_excerpt(v); }
using detail::append_utf8;
using detail::code_point_start;
using detail::next_code_point;

// The code point ending just before byte offset `end` (> 0) of valid UTF-8.
uint32_t prev_code_point(std::string_view s, size_t end) {
  size_t b = code_point_start(s, end);
  return next_code_point(s, b);
}

bool is_word_char(uint32_t cp) { return cp == '_' || u_isalnum(UChar32(cp)); }
bool is_space(uint32_t cp) { return u_isUWhiteSpace(UChar32(cp)); }

// GPT-2's byte <-> unicode alphabet: printable Latin-1 bytes stand for themselves, the others for
// U+0100 onwards, in byte order.
struct ByteAlphabet {
  uint32_t to_cp[256];
  std::unordered_map<uint32_t, uint8_t> to_byte;
  ByteAlphabet() {
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      to_cp[b] = printable ? b : 256 + extra++;
      to_byte[to_cp[b]] = uint8_t(b);
    }
  }
};
const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet a;
  return a;
}

// One pre-tokenizer step: a regex split (Isolated), or the ByteLevel step (optional prefix space and regex).
struct PreStep {
  bool byte_level = false;
  bool add_prefix_space = false;
  std::shared_ptr<icu::RegexPattern> regex;  // null: no split
};

constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct Merge {
  int32_t rank;
  int32_t result;
};

// Ids index a dense table (id -> token), so the largest id must be near the number of tokens the file
// defines: at most this many ids without a token. Real files have none or a few (padding); the bound keeps
// the table proportional to the file (an id of 2^31-1 would otherwise allocate 64 GiB).
constexpr int64_t kMaxUnusedIds = 65536;

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_tok;  // index = id (vocabulary and added tokens)
  std::vector<uint8_t> id_special;     // 1 = special added token
  std::unordered_map<uint64_t, Merge> merges;
  int64_t n_merges = 0;
  int32_t byte_id[256] = {};
  bool ignore_merges = false;
  std::vector<AddedToken> added;
  // Added tokens by first byte, longest first.
  std::vector<const AddedToken*> added_by_byte[256];
  std::vector<const icu::Normalizer2*> normalizers;
  std::vector<PreStep> steps;

  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail(source, ": ", field, ": ", what);
  }

  void load(const Json& j);
  void load_model(const Json& m);
  void load_normalizer(const Json& n, const std::string& field);
  void load_pre_tokenizer(const Json& p, const std::string& field);
  std::optional<std::string> component_type(const Json& c, const std::string& field, const char* list_key,
                                            void (Impl::*load_item)(const Json&, const std::string&));
  std::shared_ptr<icu::RegexPattern> compile(const std::string& text, bool literal, const std::string& field) const;

  void bpe(std::string_view bytes, std::vector<int32_t>& out) const;
  void encode_text(std::string_view text, std::vector<int32_t>& out) const;
};

// --- loading ---

void Tokenizer::Impl::load(const Json& j) {
  if (!j.is_object()) bad("top level", "must be a JSON object");
  auto model = j.find("model");
  if (model == j.end() || !model->is_object()) bad("model", "missing or not an object");
  load_model(*model);

  auto norm = j.find("normalizer");
  if (norm != j.end() && !norm->is_null()) load_normalizer(*norm, "normalizer");
  auto pre = j.find("pre_tokenizer");
  if (pre == j.end() || pre->is_null())
    bad("pre_tokenizer", "missing (byte-level BPE needs a ByteLevel pre-tokenizer)");
  load_pre_tokenizer(*pre, "pre_tokenizer");
  if (std::none_of(steps.begin(), steps.end(), [](const PreStep& s) { return s.byte_level; }))
    bad("pre_tokenizer", "has no ByteLevel step (only byte-level BPE is supported)");
  for (const char* key : {"decoder", "post_processor"}) {
    auto d = j.find(key);
    if (d == j.end() || d->is_null()) continue;
    const std::string type =
        d->is_object() && d->contains("type") && (*d)["type"].is_string() ? (*d)["type"].get<std::string>() : "";
    if (type != "ByteLevel")
      bad(key, "type " + excerpt(d->is_object() && d->contains("type") ? (*d)["type"] : *d) +
                   " is not supported (ByteLevel or null)");
  }

  // Added tokens.
  auto at = j.find("added_tokens");
  if (at != j.end() && !at->is_null()) {
    if (!at->is_array()) bad("added_tokens", "must be a list");
    for (size_t i = 0; i < at->size(); ++i) {
      const Json& t = (*at)[i];
      const std::string f = "added_tokens[" + std::to_string(i) + "]";
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() || !t.contains("content") ||
          !t["content"].is_string())
        bad(f, "must be an object with an integer id and a string content (got " + excerpt(t) + ")");
      AddedToken a;
      const int64_t id = t["id"].get<int64_t>();
      if (id < 0 || id > INT32_MAX) bad(f + ".id", "must be in [0, 2^31) (got " + std::to_string(id) + ")");
      a.id = int32_t(id);
      a.content = t["content"].get<std::string>();
      if (a.content.empty()) bad(f + ".content", "must not be empty");
      if (!is_valid_utf8(a.content)) bad(f + ".content", "is not valid UTF-8");
      auto flag = [&](const char* k) {
        auto it = t.find(k);
        if (it == t.end() || it->is_null()) return false;
        if (!it->is_boolean()) bad(f + "." + k, "must be true or false (got " + excerpt(*it) + ")");
        return it->get<bool>();
      };
      a.special = flag("special");
      a.lstrip = flag("lstrip");
      a.rstrip = flag("rstrip");
      a.single_word = flag("single_word");
      a.normalized = flag("normalized");
      added.push_back(std::move(a));
    }
  }
  const int64_t defined = int64_t(vocab.size() + added.size());
  for (size_t i = 0; i < added.size(); ++i)
    if (added[i].id >= defined + kMaxUnusedIds)
      bad("added_tokens[" + std::to_string(i) + "].id",
          detail::cat(added[i].id, " is far beyond the ", defined, " tokens the file defines (ids must be < ", defined,
                      " + ", kMaxUnusedIds, ")"));
  for (const AddedToken& a : added) {
    if (size_t(a.id) >= id_to_tok.size()) {
      id_to_tok.resize(size_t(a.id) + 1);
      id_special.resize(size_t(a.id) + 1);
    }
    id_to_tok[size_t(a.id)] = a.content;
    id_special[size_t(a.id)] = a.special;
  }
  for (const AddedToken& a : added) added_by_byte[uint8_t(a.content[0])].push_back(&a);
  for (auto& v : added_by_byte)
    std::stable_sort(v.begin(), v.end(),
                     [](const AddedToken* x, const AddedToken* y) { return x->content.size() > y->content.size(); });
}

void Tokenizer::Impl::load_model(const Json& m) {
  auto str = [&](const char* k) -> std::string {
    auto it = m.find(k);
    if (it == m.end() || it->is_null()) return "";
    if (!it->is_string()) bad(std::string("model.") + k, "must be a string (got " + excerpt(*it) + ")");
    return it->get<std::string>();
  };
  const std::string type = str("type");
  if (!type.empty() && type != "BPE") bad("model.type", "\"" + type + "\" is not supported (only BPE)");
  if (m.contains("dropout") && !m["dropout"].is_null())
    bad("model.dropout", "BPE dropout is not supported (got " + excerpt(m["dropout"]) + ")");
  if (m.contains("byte_fallback") && m["byte_fallback"].is_boolean() && m["byte_fallback"].get<bool>())
    bad("model.byte_fallback", "true is not supported (byte-level BPE needs no fallback)");
  if (!str("continuing_subword_prefix").empty())
    bad("model.continuing_subword_prefix", "is not supported (must be empty)");
  if (!str("end_of_word_suffix").empty()) bad("model.end_of_word_suffix", "is not supported (must be empty)");
  if (m.contains("ignore_merges") && m["ignore_merges"].is_boolean()) ignore_merges = m["ignore_merges"].get<bool>();

  auto v = m.find("vocab");
  if (v == m.end() || !v->is_object()) bad("model.vocab", "missing or not an object {token: id}");
  vocab.reserve(v->size());
  int64_t max_id = -1;
  for (auto it = v->begin(); it != v->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      bad("model.vocab[\"" + it.key() + "\"]", "must be a token id in [0, 2^31) (got " + excerpt(it.value()) + ")");
    const int32_t id = int32_t(it.value().get<int64_t>());
    vocab.emplace(it.key(), id);
    max_id = std::max<int64_t>(max_id, id);
  }
  if (max_id >= int64_t(vocab.size()) + kMaxUnusedIds)
    for (auto it = v->begin(); it != v->end(); ++it)
      if (it.value().get<int64_t>() == max_id)
        bad("model.vocab[\"" + it.key() + "\"]",
            detail::cat(max_id, " is far beyond the ", vocab.size(), " tokens the vocabulary defines (ids must be < ",
                        vocab.size(), " + ", kMaxUnusedIds, ")"));
  id_to_tok.assign(size_t(max_id + 1), std::string());
  id_special.assign(size_t(max_id + 1), 0);
  for (const auto& [tok, id] : vocab) {
    if (!id_to_tok[size_t(id)].empty())
      bad("model.vocab",
          "id " + std::to_string(id) + " is given to both \"" + id_to_tok[size_t(id)] + "\" and \"" + tok + "\"");
    id_to_tok[size_t(id)] = tok;
  }
  const ByteAlphabet& A = byte_alphabet();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    append_utf8(s, A.to_cp[b]);
    auto it = vocab.find(s);
    if (it == vocab.end())
      bad("model.vocab", "lacks the byte-level symbol \"" + s + "\" for byte " + std::to_string(b) +
                             " (byte-level BPE needs all 256)");
    byte_id[b] = it->second;
  }

  auto mg = m.find("merges");
  if (mg == m.end() || !mg->is_array()) bad("model.merges", "missing or not a list");
  merges.reserve(mg->size());
  int32_t rank = 0;
  for (size_t i = 0; i < mg->size(); ++i) {
    const Json& e = (*mg)[i];
    const std::string f = "model.merges[" + std::to_string(i) + "]";
    std::string a, b;
    if (e.is_string()) {  // the old form: "a b"
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || sp == 0 || sp + 1 == s.size() || s.find(' ', sp + 1) != std::string::npos)
        bad(f, "must be two tokens separated by one space (got " + excerpt(e) + ")");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {  // the new form: [a, b]
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      bad(f, "must be \"a b\" or [\"a\", \"b\"] (got " + excerpt(e) + ")");
    }
    auto ia = vocab.find(a), ib = vocab.find(b), ir = vocab.find(a + b);
    if (ia == vocab.end()) bad(f, "token \"" + a + "\" is not in the vocabulary");
    if (ib == vocab.end()) bad(f, "token \"" + b + "\" is not in the vocabulary");
    if (ir == vocab.end()) bad(f, "the merged token \"" + a + b + "\" is not in the vocabulary");
    const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    merges.emplace(key, Merge{rank++, ir->second});  // a repeated pair keeps its first (lowest) rank
  }
  n_merges = int64_t(mg->size());
}

std::shared_ptr<icu::RegexPattern> Tokenizer::Impl::compile(const std::string& text, bool literal,
                                                            const std::string& field) const {
  UErrorCode st = U_ZERO_ERROR;
  UParseError pe{};
  std::shared_ptr<icu::RegexPattern> p(
      icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(text), literal ? UREGEX_LITERAL : 0, pe, st));
  if (U_FAILURE(st) || !p)
    bad(field, std::string("ICU cannot compile the regex (") + u_errorName(st) + " at offset " +
                   std::to_string(pe.offset) + "): " + text);
  return p;
}

// The type of a normalizer or pre-tokenizer `c` (an object with a string "type"); a "Sequence" of them is
// loaded here instead, item by item (its list under `list_key`), and gives nullopt.
std::optional<std::string> Tokenizer::Impl::component_type(const Json& c, const std::string& field,
                                                           const char* list_key,
                                                           void (Impl::*load_item)(const Json&, const std::string&)) {
  if (!c.is_object() || !c.contains("type") || !c["type"].is_string())
    bad(field, "must be an object with a type (got " + excerpt(c) + ")");
  std::string type = c["type"].get<std::string>();
  if (type != "Sequence") return type;
  const std::string list = field + "." + list_key;
  auto it = c.find(list_key);
  if (it == c.end() || !it->is_array()) bad(list, "must be a list");
  for (size_t i = 0; i < it->size(); ++i) (this->*load_item)((*it)[i], list + "[" + std::to_string(i) + "]");
  return std::nullopt;
}

void Tokenizer::Impl::load_normalizer(const Json& n, const std::string& field) {
  const std::optional<std::string> t = component_type(n, field, "normalizers", &Impl::load_normalizer);
  if (!t) return;
  const std::string& type = *t;
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* nz = nullptr;
  if (type == "NFC") nz = icu::Normalizer2::getNFCInstance(st);
  else if (type == "NFD") nz = icu::Normalizer2::getNFDInstance(st);
  else if (type == "NFKC") nz = icu::Normalizer2::getNFKCInstance(st);
  else if (type == "NFKD") nz = icu::Normalizer2::getNFKDInstance(st);
  else bad(field + ".type", "\"" + type + "\" is not supported (NFC, NFD, NFKC, NFKD or a Sequence of them)");
  if (U_FAILURE(st) || !nz) bad(field, std::string("ICU normalizer unavailable: ") + u_errorName(st));
  normalizers.push_back(nz);
}

void Tokenizer::Impl::load_pre_tokenizer(const Json& p, const std::string& field) {
  const std::optional<std::string> t = component_type(p, field, "pretokenizers", &Impl::load_pre_tokenizer);
  if (!t) return;
  const std::string& type = *t;
  auto boolean = [&](const char* k, bool def) {
    auto it = p.find(k);
    if (it == p.end() || it->is_null()) return def;
    if (!it->is_boolean()) bad(field + "." + k, "must be true or false (got " + excerpt(*it) + ")");
    return it->get<bool>();
  };
  if (type == "Split") {
    auto pat = p.find("pattern");
    if (pat == p.end() || !pat->is_object()) bad(field + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...}");
    PreStep s;
    if (pat->contains("Regex") && (*pat)["Regex"].is_string())
      s.regex = compile((*pat)["Regex"].get<std::string>(), false, field + ".pattern.Regex");
    else if (pat->contains("String") && (*pat)["String"].is_string())
      s.regex = compile((*pat)["String"].get<std::string>(), true, field + ".pattern.String");
    else bad(field + ".pattern", "must be {\"Regex\": ...} or {\"String\": ...} (got " + excerpt(*pat) + ")");
    const std::string behavior =
        p.contains("behavior") && p["behavior"].is_string() ? p["behavior"].get<std::string>() : "";
    if (behavior != "Isolated") bad(field + ".behavior", "\"" + behavior + "\" is not supported (only Isolated)");
    if (boolean("invert", false)) bad(field + ".invert", "true is not supported");
    steps.push_back(std::move(s));
    return;
  }
  if (type == "ByteLevel") {
    PreStep s;
    s.byte_level = true;
    s.add_prefix_space = boolean("add_prefix_space", true);
    if (boolean("use_regex", true)) s.regex = compile(kGpt2Pattern, false, field);
    steps.push_back(std::move(s));
    return;
  }
  bad(field + ".type", "\"" + type + "\" is not supported (Split, ByteLevel or a Sequence of them)");
}

// --- encoding ---

// Merges the byte symbols of one piece by rank: lowest rank first, leftmost among equal ranks.
void Tokenizer::Impl::bpe(std::string_view bytes, std::vector<int32_t>& out) const {
  const ByteAlphabet& A = byte_alphabet();
  if (ignore_merges) {
    std::string s;
    for (char c : bytes) append_utf8(s, A.to_cp[uint8_t(c)]);
    auto it = vocab.find(s);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const int n = int(bytes.size());
  if (n == 1) {
    out.push_back(byte_id[uint8_t(bytes[0])]);
    return;
  }
  struct Sym {
    int32_t id;
    int prev, next;
  };
  std::vector<Sym> sym(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) sym[size_t(i)] = Sym{byte_id[uint8_t(bytes[size_t(i)])], i - 1, i + 1 < n ? i + 1 : -1};
  struct Cand {
    int32_t rank;
    int pos, right;
    int32_t left_id, right_id, result;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> q;
  auto push = [&](int a) {
    if (a < 0) return;
    const int b = sym[size_t(a)].next;
    if (b < 0) return;
    const uint64_t key = (uint64_t(uint32_t(sym[size_t(a)].id)) << 32) | uint32_t(sym[size_t(b)].id);
    auto it = merges.find(key);
    if (it != merges.end())
      q.push(Cand{it->second.rank, a, b, sym[size_t(a)].id, sym[size_t(b)].id, it->second.result});
  };
  for (int i = 0; i + 1 < n; ++i) push(i);
  std::vector<uint8_t> dead(static_cast<size_t>(n), 0);
  while (!q.empty()) {
    const Cand c = q.top();
    q.pop();
    Sym& a = sym[size_t(c.pos)];
    if (dead[size_t(c.pos)] || dead[size_t(c.right)] || a.next != c.right || a.id != c.left_id ||
        sym[size_t(c.right)].id != c.right_id)
      continue;  // stale: one side was merged since
    a.id = c.result;
    dead[size_t(c.right)] = 1;
    a.next = sym[size_t(c.right)].next;
    if (a.next >= 0) sym[size_t(a.next)].prev = c.pos;
    push(a.prev);
    push(c.pos);
  }
  for (int i = 0; i >= 0; i = sym[size_t(i)].next) out.push_back(sym[size_t(i)].id);
}

// Normalise, pre-tokenise and merge one stretch of text between added tokens.
void Tokenizer::Impl::encode_text(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::string norm(text);
  for (const icu::Normalizer2* nz : normalizers) {
    UErrorCode st = U_ZERO_ERROR;
    if (nz->isNormalizedUTF8(norm, st) && U_SUCCESS(st)) continue;
    st = U_ZERO_ERROR;
    std::string res;
    icu::StringByteSink<std::string> sink(&res, int32_t(norm.size()));
    nz->normalizeUTF8(0, norm, sink, nullptr, st);
    if (U_FAILURE(st)) fail("tokenizer: normalization failed: ", u_errorName(st));
    norm = std::move(res);
  }
  std::vector<std::string> pieces{std::move(norm)}, next;
  for (const PreStep& s : steps) {
    next.clear();
    std::unique_ptr<icu::RegexMatcher> m;
    UErrorCode st = U_ZERO_ERROR;
    if (s.regex) {
      m.reset(s.regex->matcher(st));
      // ICU's backtracking stack is capped at 8 MB by default, and Qwen's regex pushes a state per
      // character of a whitespace run (about 100 bytes each): 500 KB of spaces failed with
      // U_REGEX_STACK_OVERFLOW. Without the cap the stack grows only as far as the longest match needs,
      // so memory stays proportional to the prompt and any prompt that fits in memory tokenizes.
      if (U_SUCCESS(st)) m->setStackLimit(0, st);
      if (U_FAILURE(st)) fail("tokenizer: cannot create a regex matcher: ", u_errorName(st));
    }
    for (std::string& p : pieces) {
      if (s.byte_level && s.add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
      if (!m) {
        next.push_back(std::move(p));
        continue;
      }
      UText* ut = utext_openUTF8(nullptr, p.data(), int64_t(p.size()), &st);
      if (U_FAILURE(st)) fail("tokenizer: utext_openUTF8 failed: ", u_errorName(st));
      m->reset(ut);
      int64_t last = 0;
      while (m->find(st) && U_SUCCESS(st)) {
        const int64_t b = m->start64(st), e = m->end64(st);
        if (b > last) next.emplace_back(p.substr(size_t(last), size_t(b - last)));  // Isolated: gaps are pieces too
        if (e > b) next.emplace_back(p.substr(size_t(b), size_t(e - b)));
        last = e;
      }
      if (U_FAILURE(st)) {
        utext_close(ut);
        fail("tokenizer: regex matching failed: ", u_errorName(st));
      }
      if (last < int64_t(p.size())) next.emplace_back(p.substr(size_t(last)));
      utext_close(ut);  // the matcher keeps its own shallow clone, over p, until the next reset
    }
    pieces.swap(next);
  }
  for (const std::string& p : pieces)
    if (!p.empty()) bpe(p, out);
}

// --- public API ---

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::parse(std::string_view json_text, const std::string& source) {
  const Json j = detail::parse_json(json_text, source);
  Tokenizer t;
  t.impl_->source = source;
  t.impl_->load(j);
  return t;
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::string p = path;
  const std::string text = detail::read_json_text(p, "tokenizer.json");
  return parse(text, p);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  const Impl& I = *impl_;
  size_t bad = 0;
  if (!is_valid_utf8(text, &bad)) fail("tokenizer: input is not valid UTF-8 (byte ", bad, " of ", text.size(), ")");
  std::vector<int32_t> out;
  size_t seg = 0;  // start of the current stretch of plain text
  for (size_t i = 0; i < text.size();) {
    const AddedToken* hit = nullptr;
    for (const AddedToken* a : I.added_by_byte[uint8_t(text[i])]) {
      if (!parse_special && a->special) continue;
      if (text.compare(i, a->content.size(), a->content) != 0) continue;
      if (a->single_word) {
        const size_t e = i + a->content.size();
        if ((i > 0 && is_word_char(prev_code_point(text, i))) || (e < text.size() && [&] {
              size_t k = e;
              return is_word_char(next_code_point(text, k));
            }()))
          continue;
      }
      hit = a;  // longest first, so the first hit is the longest match here
      break;
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t b = i, e = i + hit->content.size();
    if (hit->lstrip)
      while (b > seg) {
        const size_t k = code_point_start(text, b, seg);  // start of the previous code point
        size_t t = k;
        if (!is_space(next_code_point(text, t))) break;
        b = k;
      }
    if (hit->rstrip)
      while (e < text.size()) {
        size_t k = e;
        if (!is_space(next_code_point(text, k))) break;
        e = k;
      }
    I.encode_text(text.substr(seg, b - seg), out);
    out.push_back(hit->id);
    seg = i = e;
  }
  I.encode_text(text.substr(seg), out);
  return out;
}

std::string Tokenizer::decode_bytes(std::span<const int32_t> ids, bool skip_special) const {
  const Impl& I = *impl_;
  const ByteAlphabet& A = byte_alphabet();
  std::string out, bytes;
  for (int32_t id : ids) {
    if (id < 0) fail("tokenizer: cannot decode the negative id ", id);
    if (size_t(id) >= I.id_to_tok.size() || I.id_to_tok[size_t(id)].empty()) continue;
    if (skip_special && I.id_special[size_t(id)]) continue;
    const std::string& tok = I.id_to_tok[size_t(id)];
    // A token made only of byte-alphabet characters stands for those bytes; any other (an added token
    // with characters outside the alphabet) for its own UTF-8, as HF's ByteLevel decoder does.
    bytes.clear();
    bool all = true;
    for (size_t k = 0; k < tok.size() && all;) {
      auto it = A.to_byte.find(next_code_point(tok, k));
      if (it == A.to_byte.end()) all = false;
      else bytes += char(it->second);
    }
    out += all ? bytes : tok;
  }
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  return utf8_replace_invalid(decode_bytes(ids, skip_special));
}

int64_t Tokenizer::vocab_size() const { return int64_t(impl_->id_to_tok.size()); }
int64_t Tokenizer::num_merges() const { return impl_->n_merges; }
const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

int32_t Tokenizer::token_to_id(std::string_view token) const {
  for (const AddedToken& a : impl_->added)
    if (a.content == token) return a.id;
  auto it = impl_->vocab.find(std::string(token));
  return it == impl_->vocab.end() ? -1 : it->second;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->id_to_tok.size()) return "";
  return impl_->id_to_tok[size_t(id)];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->id_special.size() && impl_->id_special[size_t(id)];
}

std::string find_reference_tokenizer(const std::vector<std::string>& roots) {
  for (const std::string& r : roots) {
    std::error_code ec;
    fs::path p = fs::weakly_canonical(fs::path(r), ec);
    if (ec) continue;
    for (; !p.empty(); p = p.parent_path()) {
      const fs::path cand = p / kReferenceTokenizerSubdir;
      if (fs::exists(cand / "tokenizer.json", ec)) return cand.string();
      if (p == p.parent_path()) break;
    }
  }
  return "";
}

}  // namespace ksa
