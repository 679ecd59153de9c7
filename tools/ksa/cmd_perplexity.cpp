// `ksa perplexity`: perplexity of a checkpoint on a text file, llama-perplexity style: the file's tokens are
// cut into non-overlapping windows of --ctx tokens (a trailing remainder is dropped), each window runs as a
// fresh sequence through the engine (Model::append, logits of every token), and the tokens of the second
// half of each window are scored (token j for j in [ctx/2 + 1, ctx), so every scored token has at least ctx/2
// tokens of context; --all scores tokens 1..ctx-1). No BOS token is added. Prints the tokens scored, the
// perplexity exp(mean NLL) and the KV-cache bytes one window holds at ctx tokens, KSA against full attention.
#include <cinttypes>
#include <cstdio>
#include <fstream>

#include "eval_common.hpp"

namespace ksa::tools {
namespace {

int run_perplexity(int argc, char** argv) {
  cli::Flags f("perplexity",
               "Perplexity of a checkpoint on a text file (llama-perplexity style): non-overlapping windows of --ctx\n"
               "tokens, each a fresh sequence; the second half of each window is scored (token j for j in\n"
               "[ctx/2 + 1, ctx): at least ctx/2 tokens of context), or with --all tokens 1..ctx-1. No BOS is added;\n"
               "a remainder shorter than --ctx is dropped. Prints the tokens scored, the perplexity and the KV-cache\n"
               "bytes of one window at ctx tokens (KSA vs full attention).");
  const ModelDirFlag model_flag(f);
  std::string& file = f.str("-f,--file", "", "the text file");
  int64_t& ctx = f.i64("--ctx", 1024, "tokens per window", 2, cli::kMaxTokens);
  int64_t& chunks = f.i64("--chunks", 0, "score at most this many windows (0 = all)", 0, cli::kMaxTokens);
  bool& all = f.flag("--all", "score tokens 1..ctx-1 of each window instead of the second half");
  const EngineFlags engine(f);
  std::string& dump =
      f.str("--dump", "", "write one line per scored token: window, index in the window, token id, log p");
  std::string& dump_logits =
      f.str("--dump-logits", "", "write the logits of every window token (f32, [windows, ctx, vocab], little-endian)");
  if (!f.parse(argc, argv)) return 0;
  const std::string dir = model_flag.dir();
  if (file.empty()) throw cli::UsageError("-f/--file: required");

  const Tokenizer tok = load_model_tokenizer(dir);
  const std::vector<int32_t> ids = tok.encode(read_text_file(file, "text file"));
  ModelOptions mo = engine.options(dir);
  mo.max_text_tokens = std::max<int64_t>(ctx, ModelConfig::load(dir).max_position_embeddings);
  Model model = Model::load(dir, mo);
  const int64_t V = model.vocab();

  int64_t windows = int64_t(ids.size()) / ctx;
  if (windows == 0) fail(file, " has ", ids.size(), " tokens, fewer than --ctx ", ctx);
  if (chunks > 0) windows = std::min(windows, chunks);
  const int64_t first = all ? 0 : ctx / 2;  // logits rows first..ctx-2 score tokens first+1..ctx-1
  std::fprintf(
      stderr,
      "ksa perplexity: %s: %zu tokens; %lld windows of %lld; scoring tokens %lld..%lld of each; %s; weights %s\n",
      file.c_str(), ids.size(), (long long)windows, (long long)ctx, (long long)(first + 1), (long long)(ctx - 1),
      model.backend_name().c_str(), model.weight_format().c_str());

  std::ofstream dump_out, logits_out;
  if (!dump.empty()) {
    dump_out.open(dump, std::ios::trunc);
    if (!dump_out) fail(dump, ": cannot write");
  }
  if (!dump_logits.empty()) {
    logits_out.open(dump_logits, std::ios::binary | std::ios::trunc);
    if (!logits_out) fail(dump_logits, ": cannot write");
  }
  std::vector<float> logits(size_t(ctx * V));
  double nll = 0;
  int64_t scored = 0, kv = 0, kv_full = 0;
  const double t0 = now_s();
  for (int64_t w = 0; w < windows; ++w) {
    const std::span<const int32_t> win(ids.data() + w * ctx, size_t(ctx));
    const SeqId seq = model.new_sequence();
    model.append(seq, win, LogitsFor::all, logits);
    kv = model.kv_bytes(seq);
    kv_full = model.kv_bytes_full_attention(seq);
    model.release(seq);
    if (logits_out)
      logits_out.write(reinterpret_cast<const char*>(logits.data()), std::streamsize(logits.size() * sizeof(float)));
    for (int64_t j = first; j + 1 < ctx; ++j) {
      const double lp = log_prob(std::span<const float>(logits.data() + j * V, size_t(V)), win[size_t(j + 1)]);
      nll -= lp;
      ++scored;
      if (dump_out) dump_out << w << ' ' << j + 1 << ' ' << win[size_t(j + 1)] << ' ' << lp << '\n';
    }
    std::fprintf(stderr, "[%lld/%lld] ppl %.4f\n", (long long)(w + 1), (long long)windows,
                 std::exp(nll / double(scored)));
  }
  if (logits_out && !logits_out.flush()) fail(dump_logits, ": write error");
  if (dump_out && !dump_out.flush()) fail(dump, ": write error");
  const double secs = now_s() - t0;
  std::printf("windows %lld, ctx %lld, tokens scored %lld (%s), mean NLL %.6f nats, ppl %.4f\n", (long long)windows,
              (long long)ctx, (long long)scored, all ? "tokens 1..ctx-1" : "second half of each window",
              nll / double(scored), std::exp(nll / double(scored)));
  std::printf("KV cache at %lld tokens: %lld bytes (%s) vs %lld bytes full attention; %s\n", (long long)ctx,
              (long long)kv, dtype_name(mo.kv_dtype), (long long)kv_full,
              kv_comparison(kv, kv_full, model.config().use_summary_attention).c_str());
  std::fprintf(stderr, "ksa perplexity: %.2f s (%.1f tokens per second)\n", secs, double(windows * ctx) / secs);
  return 0;
}

cli::Register reg{{"perplexity", "perplexity of a checkpoint on a text file (llama-perplexity style)", run_perplexity}};

}  // namespace
}  // namespace ksa::tools
