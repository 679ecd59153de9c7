// `ksa generate`: text generation on the GPU (--device cuda) or the CPU from a checkpoint directory (config.json,
// safetensors, tokenizer.json): encode the prompt (optionally through the Qwen3 chat template), run it through the
// model in one append, then sample token by token, streaming the decoded text to stdout. Timings and the KV-cache bytes
// (KSA against full attention) go to stderr at the end, in llama.cpp's style.
//
// Stops at an end-of-sequence id (generation_config.json `eos_token_id`, else config.json's; with --chat also
// <|im_end|>), at a --stop string (the text before it is printed, the string itself not), at -n tokens, or at
// the context limit.
#include <algorithm>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include <signal.h>
#include <unistd.h>
#ifdef KSA_HAVE_LIBEDIT
#include <editline/readline.h>
#endif

#include "common.hpp"
#include "ksa/chat_template.hpp"
#include "ksa/generation_config.hpp"
#include "ksa/model.hpp"
#include "ksa/sampler.hpp"
#include "ksa/text_stream.hpp"
#include "ksa/tokenizer.hpp"

namespace ksa::tools {
namespace {

namespace fs = std::filesystem;

// Writes released text to stdout as it comes, remembering the last character (for the final newline).
class StdoutWriter {
 public:
  void write(const std::string& s) {
    if (s.empty()) return;
    std::fwrite(s.data(), 1, s.size(), stdout);
    std::fflush(stdout);
    last_ = s.back();
  }
  char last_char() const { return last_; }

 private:
  char last_ = '\n';
};

// --stop values: C escapes \n \t \r \\ are understood; empty strings are dropped.
std::string unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char c = s[++i];
    out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
  }
  return out;
}

std::string read_file(const std::string& path) {
  if (path == "-") {
    std::stringstream ss;
    ss << std::cin.rdbuf();
    return ss.str();
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot read the prompt file");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char c : s) out += c == '\n' ? std::string("\\n") : c == '\t' ? std::string("\\t") : std::string(1, c);
  return out + "\"";
}

void print_rate(const char* what, double secs, int64_t n, const char* unit) {
  std::fprintf(stderr, "ksa generate: %16s = %10.2f ms / %5lld %-6s", what, secs * 1e3, (long long)n, unit);
  if (n > 0 && secs > 0)
    std::fprintf(stderr, " (%8.2f ms per token, %9.2f tokens per second)", secs * 1e3 / double(n), double(n) / secs);
  std::fputc('\n', stderr);
}

// Ctrl-C in a conversation stops the current answer (and, at the prompt, ends the conversation).
volatile std::sig_atomic_t g_interrupted = 0;
extern "C" void on_interrupt(int) { g_interrupted = 1; }

// A line of the conversation from the terminal (libedit: editing, history) or from a pipe; false at the end.
bool read_turn(std::string& line) {
#ifdef KSA_HAVE_LIBEDIT
  if (isatty(STDIN_FILENO)) {
    char* l = readline("> ");
    if (!l) return false;
    line = l;
    std::free(l);
    if (!line.empty()) add_history(line.c_str());
    return true;
  }
#endif
  if (isatty(STDIN_FILENO)) std::fputs("> ", stdout), std::fflush(stdout);
  return bool(std::getline(std::cin, line));
}

// What one answer's decoding did.
struct Decoded {
  int64_t generated = 0, evals = 0, draws = 0;  // tokens kept; model steps; sampler calls
  double eval_s = 0, sample_s = 0;
  std::string why;   // why it stopped
  std::string text;  // the text released (stop string excluded)
  bool interrupted = false;
};

// The decoding loop of both modes: from `logits` (the last appended token's), sample, stream the text, append
// the token, until an end-of-sequence id, a stop string, n_predict tokens, the context limit or Ctrl-C.
// `history` (the sampler's penalty window) gains every kept token. With keep_cache_whole the token that ended
// the answer (a stop string, n_predict, not the end-of-sequence id) is appended too, so that the cache holds
// exactly `history` and a conversation's next turn continues after the whole answer.
Decoded decode_answer(Model& model, SeqId seq, Sampler& sampler, std::vector<float>& logits,
                      std::vector<int32_t>& history, const std::set<int64_t>& eos, TextStream& stream,
                      StdoutWriter& out, int64_t n_predict, bool keep_cache_whole) {
  Decoded d;
  const int64_t limit = model.max_text_tokens();
  std::string piece;
  auto append = [&](int32_t id) {
    const double te = now_s();
    model.append(seq, std::span<const int32_t>(&id, 1), LogitsFor::last, logits);
    d.eval_s += now_s() - te;
    ++d.evals;
  };
  if (n_predict == 0) d.why = "-n 0";
  while (d.generated < n_predict) {
    if (g_interrupted) {
      d.interrupted = true;
      d.why = "Ctrl-C";
      break;
    }
    const double ts = now_s();
    const int32_t id = sampler.sample(logits, history);
    d.sample_s += now_s() - ts;
    ++d.draws;
    if (eos.count(id)) {
      d.why = std::string("end-of-sequence token ").append(std::to_string(id));
      break;
    }
    history.push_back(id);
    ++d.generated;
    piece.clear();
    const bool stopped = stream.push(id, piece);
    out.write(piece);
    d.text += piece;
    if (stopped) d.why = "stop string " + quoted(stream.stop_found());
    else if (d.generated == n_predict) d.why = "-n reached";
    else if (model.text_tokens(seq) >= limit)
      d.why = std::string("the context limit of ").append(std::to_string(limit)).append(" tokens");
    if (!d.why.empty()) {
      if (keep_cache_whole && model.text_tokens(seq) < limit) append(id);
      break;
    }
    append(id);
  }
  piece.clear();
  stream.finish(piece);
  out.write(piece);
  d.text += piece;
  return d;
}

int run_generate(int argc, char** argv) {
  cli::Flags f("generate",
               "Generate text from a checkpoint directory on the GPU or the CPU (streamed to stdout; timings and "
               "KV-cache bytes\n"
               "on stderr). Sampling is greedy unless --temp > 0. Stops at an end-of-sequence id\n"
               "(generation_config.json, else config.json; with --chat also <|im_end|>), a --stop string, -n\n"
               "tokens or the context limit.");
  const ModelDirFlag model_flag(f);
  std::string& prompt_text = f.str("-p,--prompt", "", "the prompt");
  std::string& prompt_file = f.str("-f,--file", "", "read the prompt from a file ('-' = stdin)");
  int64_t& n_predict = f.i64("-n,--n-predict", 128, "tokens to generate at most", 0, cli::kMaxTokens);
  double& temp = f.f64("--temp", 0.0, "temperature; 0 = greedy (argmax), > 0 samples");
  int64_t& top_k = f.i64("--top-k", 0, "keep the k most likely tokens (0 = off)", 0, cli::kMaxTokens);
  double& top_p = f.f64("--top-p", 1.0, "nucleus: smallest set with cumulative probability >= p (1 = off)");
  double& min_p = f.f64("--min-p", 0.0, "drop tokens with p < min_p * p_max (0 = off)");
  double& rep = f.f64("--repeat-penalty", 1.0, "HF repetition penalty over prompt + generated tokens (1 = off)");
  double& pres = f.f64("--presence-penalty", 0.0, "subtracted once from every seen token's logit");
  double& freq = f.f64("--frequency-penalty", 0.0, "subtracted per occurrence of a seen token");
  int64_t& seed = f.i64("--seed", -1, "sampling seed (-1 = random, printed)", -1, cli::kAnyInt64Max);
  bool& chat =
      f.flag("--chat", "wrap the prompt as a user turn in the Qwen3 chat template (with the assistant prompt)");
  std::string& system = f.str("-sys,--system", "", "with --chat: a system message first");
  bool& no_think =
      f.flag("--no-think", "with --chat: disable thinking (Qwen3's enable_thinking=false: an empty <think></think>)");
  std::string& device = f.str(
      "--device", "auto",
      "cpu, cuda, or auto (cuda when a GPU is visible, the build has CUDA and the model's head dim is 64 or 128)");
  int64_t& threads = f.i64("-t,--threads", 0, "CPU threads (0 = all)", 0, cli::kMaxThreads);
  int64_t& ctx = f.i64("-c,--ctx-size,--ctx", 0, "context limit in text tokens (0 = config max_position_embeddings)", 0,
                       cli::kMaxTokens);
  std::vector<std::string>& stops =
      f.strs("-r,--reverse-prompt,--stop", "stop when the text contains this string (\\n, \\t escapes understood)");
  bool& kv_f32 = f.flag("--kv-f32", "keep the KV cache in f32 (default bf16)");
  bool& no_mmap = f.flag("--no-mmap", cli::kNoMmapHelp);
  bool& batch_invariant = f.flag(
      "--batch-invariant", "CPU: every matrix product row by row, as `ksa serve --batch-invariant` (slower prefill)");
  const CudaEngineFlags cuda_flags(f);
  bool& no_display = f.flag("--no-display-prompt", "do not echo the prompt to stdout");
  bool& interactive = f.flag("-i,-cnv,--interactive,--conversation",
                             "conversation: read user turns from the terminal (line editing and history), answer each "
                             "in the chat template (implies --chat; -p/-f, if given, is the first turn); the KV cache "
                             "is kept between turns; /reset starts over, /exit or Ctrl-D ends");
  if (!f.parse(argc, argv)) return 0;
  const std::string dir = model_flag.dir();
  if (interactive) chat = true;
  if (f.given("--prompt") && f.given("--file")) throw cli::UsageError("give exactly one of -p/--prompt and -f/--file");
  if (!interactive && !f.given("--prompt") && !f.given("--file"))
    throw cli::UsageError("give exactly one of -p/--prompt and -f/--file (or -i for a conversation)");
  if (!chat && (f.given("--system") || no_think)) throw cli::UsageError("--system and --no-think need --chat");

  SamplerConfig sc;
  sc.temperature = float(temp);
  sc.top_k = top_k;
  sc.top_p = float(top_p);
  sc.min_p = float(min_p);
  sc.repetition_penalty = float(rep);
  sc.presence_penalty = float(pres);
  sc.frequency_penalty = float(freq);
  sc.seed = seed >= 0 ? uint64_t(seed) : (uint64_t(std::random_device{}()) << 32 | std::random_device{}());
  Sampler sampler(sc);  // validates: throws ksa::Error naming the field

  std::vector<std::string> stop_strings;
  for (const std::string& s : stops)
    if (std::string u = unescape(s); !u.empty()) stop_strings.push_back(std::move(u));

  if (!fs::is_directory(dir)) fail("model directory '", dir, "' does not exist or is not a directory");
  const fs::path tok_path = fs::path(dir) / "tokenizer.json";
  if (!fs::exists(tok_path))
    fail(dir,
         " has no tokenizer.json (ksa generate needs one; `ksa make-model` copies the Qwen3 tokenizer that "
         "scripts/fetch_test_data.sh caches, or pass it --tokenizer DIR; or copy a tokenizer.json there)");

  std::string text = f.given("--prompt") ? prompt_text : f.given("--file") ? read_file(prompt_file) : std::string();

  // Load: tokenizer, then the weights (with a progress bar on a terminal).
  const double t_load0 = now_s();
  const Tokenizer tok = Tokenizer::load(tok_path.string());
  ModelOptions mo;
  mo.device = parse_device_flag(device, dir);
  if (mo.device == Device::cuda && kv_f32)
    throw cli::UsageError("--kv-f32: the CUDA engine keeps the KV cache in bf16");
  if (mo.device == Device::cuda && batch_invariant) throw cli::UsageError("--batch-invariant: CPU only");
  mo.threads = int(threads);
  mo.max_text_tokens = ctx;
  mo.kv_dtype = kv_f32 ? DType::f32 : DType::bf16;
  mo.batch_invariant = batch_invariant;
  if (no_mmap) mo.load = FileLoad::copy;
  cuda_flags.apply(mo);
  mo.progress = weight_progress();
  Model model = Model::load(dir, mo);
  const double load_s = now_s() - t_load0;
  const ModelConfig& cfg = model.config();

  // End-of-sequence ids.
  const GenerationConfig gen = load_generation_config(dir);
  std::set<int64_t> eos(gen.eos_token_ids.begin(), gen.eos_token_ids.end());
  if (eos.empty()) eos.insert(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end());

  if (interactive) {
    if (const int32_t im_end = tok.token_to_id("<|im_end|>"); im_end >= 0) eos.insert(im_end);
    std::fprintf(stderr, "ksa generate: %s: %s; context %lld; a conversation (/reset, /exit, Ctrl-D)\n", dir.c_str(),
                 model.backend_name().c_str(), (long long)model.max_text_tokens());
    std::vector<ChatMessage> msgs;
    if (f.given("--system")) msgs.push_back({"system", system, std::nullopt});
    const size_t base = msgs.size();
    ChatOptions co;
    co.add_generation_prompt = true;
    if (no_think) co.enable_thinking = false;
    struct sigaction sa = {};
    sa.sa_handler = on_interrupt;  // no SA_RESTART: Ctrl-C at the prompt ends the read
    sigaction(SIGINT, &sa, nullptr);
    SeqId seq = model.new_sequence();
    std::vector<int32_t> history;  // the tokens the sequence holds
    std::vector<float> logits(size_t(model.vocab()));
    std::string line = text;
    bool have = !text.empty();
    for (int turn = 1;;) {
      if (!have && !read_turn(line)) break;
      have = false;
      while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
      if (line.empty()) continue;
      if (line == "/exit" || line == "/quit") break;
      if (line == "/reset") {
        model.release(seq);
        seq = model.new_sequence();
        history.clear();
        msgs.resize(base);
        std::fprintf(stderr, "ksa generate: conversation reset\n");
        continue;
      }
      msgs.push_back({"user", line, std::nullopt});
      // The first turn is the rendered conversation; a later one only the template's text after the previous
      // answer (a marker stands in for it), so that the history in the cache is never recomputed.
      std::string turn_text = render_qwen3_chat(msgs, co);
      if (!history.empty()) {
        static const std::string kMark = "\x01ksa-answer\x01";
        std::vector<ChatMessage> probe(msgs);
        probe[probe.size() - 2].content = kMark;
        const std::string r = render_qwen3_chat(probe, co);
        const size_t at = r.rfind(kMark);
        if (at == std::string::npos) fail("the chat template dropped the previous answer");
        turn_text = r.substr(at + kMark.size());
      }
      const std::vector<int32_t> fresh = tok.encode(turn_text);
      if (int64_t(history.size() + fresh.size()) >= model.max_text_tokens()) {
        std::fprintf(stderr, "ksa generate: the conversation would hold %zu tokens, the context is %lld: /reset\n",
                     history.size() + fresh.size(), (long long)model.max_text_tokens());
        msgs.pop_back();
        continue;
      }
      const double t0 = now_s();
      model.append(seq, fresh, LogitsFor::last, logits);
      const double pp_s = now_s() - t0;
      history.insert(history.end(), fresh.begin(), fresh.end());
      TextStream stream(tok, stop_strings);
      StdoutWriter out;
      g_interrupted = 0;
      const double t1 = now_s();
      const Decoded d = decode_answer(model, seq, sampler, logits, history, eos, stream, out, n_predict, true);
      if (out.last_char() != '\n') std::fputc('\n', stdout);
      std::fflush(stdout);
      msgs.push_back({"assistant", d.text, std::nullopt});
      std::fprintf(stderr,
                   "ksa generate: turn %d: %zu new prompt tokens (%.0f ms), %lld generated%s (%.1f tok/s); KV "
                   "cache %s at %lld tokens\n",
                   turn++, fresh.size(), pp_s * 1e3, (long long)d.generated, d.interrupted ? ", stopped by Ctrl-C" : "",
                   d.generated / std::max(1e-9, now_s() - t1), human_bytes(double(model.kv_bytes(seq))).c_str(),
                   (long long)model.text_tokens(seq));
    }
    model.release(seq);
    return 0;
  }

  if (chat) {
    const fs::path tc = fs::path(dir) / "tokenizer_config.json";
    if (fs::exists(tc) && !ChatTemplate::load(tc.string()).recognized())
      std::fprintf(stderr, "ksa generate: warning: %s has a chat template other than Qwen3's; rendering Qwen3's\n",
                   tc.c_str());
    std::vector<ChatMessage> msgs;
    if (f.given("--system")) msgs.push_back({"system", system, std::nullopt});
    msgs.push_back({"user", text, std::nullopt});
    ChatOptions co;
    co.add_generation_prompt = true;
    if (no_think) co.enable_thinking = false;
    text = render_qwen3_chat(msgs, co);
    if (const int32_t im_end = tok.token_to_id("<|im_end|>"); im_end >= 0) eos.insert(im_end);
  }

  const std::vector<int32_t> prompt = tok.encode(text);
  const int64_t limit = model.max_text_tokens();
  if (prompt.empty()) fail("the prompt is empty (it encodes to no tokens)");
  if (int64_t(prompt.size()) > limit)
    fail("the prompt is ", prompt.size(), " tokens, more than the context limit of ", limit,
         ctx > 0 ? " (--ctx)" : " (config.json max_position_embeddings; --ctx sets a smaller one)");

  std::string eos_list;
  for (int64_t e : eos) {
    if (!eos_list.empty()) eos_list += ',';
    eos_list += std::to_string(e);
  }
  std::fprintf(stderr, "ksa generate: %s: %s%s, %lld layers, hidden %lld, weights %s %s; %s; context %lld; KV %s\n",
               dir.c_str(), cfg.model_type.c_str(), cfg.use_summary_attention ? "+KSA" : "",
               (long long)cfg.num_hidden_layers, (long long)cfg.hidden_size,
               human_bytes(double(model.weight_bytes())).c_str(), model.weight_format().c_str(),
               model.backend_name().c_str(), (long long)limit, dtype_name(mo.kv_dtype));
  if (sc.temperature == 0.f)
    std::fprintf(stderr, "ksa generate: prompt %zu tokens; greedy; eos %s\n", prompt.size(), eos_list.c_str());
  else
    std::fprintf(stderr, "ksa generate: prompt %zu tokens; temp %g top-k %lld top-p %g min-p %g seed %llu; eos %s\n",
                 prompt.size(), double(sc.temperature), (long long)sc.top_k, double(sc.top_p), double(sc.min_p),
                 (unsigned long long)sc.seed, eos_list.c_str());
  if (!no_display) {
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
  }

  // Prompt: one append, logits of its last token.
  const SeqId seq = model.new_sequence();
  std::vector<float> logits(size_t(model.vocab()));
  const double t_pp0 = now_s();
  if (n_predict > 0) model.append(seq, prompt, LogitsFor::last, logits);
  else model.append(seq, prompt, LogitsFor::none, {});
  const double pp_s = now_s() - t_pp0;

  // Generation.
  TextStream stream(tok, stop_strings);
  StdoutWriter out;
  std::vector<int32_t> history = prompt;
  const Decoded d = decode_answer(model, seq, sampler, logits, history, eos, stream, out, n_predict, false);
  if (out.last_char() != '\n' || (no_display && d.generated == 0)) std::fputc('\n', stdout);
  std::fflush(stdout);

  const int64_t kv = model.kv_bytes(seq), kv_full = model.kv_bytes_full_attention(seq);
  std::fprintf(stderr, "\nksa generate: stopped: %s (%lld tokens generated)\n", d.why.c_str(), (long long)d.generated);
  std::fprintf(stderr, "ksa generate: %16s = %10.2f ms\n", "load time", load_s * 1e3);
  print_rate("prompt eval time", pp_s, int64_t(prompt.size()), "tokens");
  print_rate("eval time", d.eval_s, d.evals, "runs");
  print_rate("sampling time", d.sample_s, d.draws, "draws");
  std::fprintf(stderr, "ksa generate: %16s = at %lld text tokens (%s) %s\n", "KV cache",
               (long long)model.text_tokens(seq), dtype_name(mo.kv_dtype),
               kv_comparison(kv, kv_full, cfg.use_summary_attention).c_str());
  return 0;
}

cli::Register reg{{"generate", "generate text from a checkpoint (GPU or CPU)", run_generate}};

}  // namespace
}  // namespace ksa::tools
