// `ksa eval passkey`: passkey retrieval accuracy of a checkpoint per distance. Each trial builds the prompt of
// eval_common.hpp (a random 5-digit key stated in filler text, the question `distance` tokens after the key),
// runs it as a fresh sequence and decodes kKeyDigits tokens greedily; a trial is correct when all digits are.
// The prompt is the one the training recipe mixes into its data (python/ksa_train/data.py).
#include <cinttypes>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "eval_common.hpp"

namespace ksa::tools {
namespace {

std::vector<int64_t> parse_lengths(const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    int64_t v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = std::string::npos;
    }
    if (used != item.size() || item.empty() || v < 1 || v > cli::kMaxTokens)
      throw cli::UsageError("--lengths: expected positive integers separated by commas (got '" + s + "')");
    out.push_back(v);
  }
  if (out.empty()) throw cli::UsageError("--lengths: empty");
  return out;
}

std::string ids_json(std::span<const int32_t> ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  return s + "]";
}

int run_passkey(int argc, char** argv) {
  cli::Flags f(
      "eval passkey",
      "Passkey retrieval accuracy per distance: a random 5-digit key stated in filler text (\"The pass key is\n"
      "48213. Remember it.\"), then `distance` tokens later the question \"What is the pass key? The pass key\n"
      "is \"; 5 tokens decoded greedily; a trial counts when all 5 digits are right. The distance is counted\n"
      "from the key's first digit to the first answer token. Before the needle come 0..--before filler tokens\n"
      "(random per trial). Filler: a random stretch of the --filler file's tokens.");
  const ModelDirFlag model_flag(f);
  std::string& filler_file = f.str("-f,--filler", "", "text file whose tokens fill the prompt (e.g. held-out text)");
  std::string& lengths_s = f.str("--lengths", "256,512,1024,2048,4096", "distances in tokens, comma-separated");
  int64_t& trials = f.i64("--trials", 20, "trials per distance", 1, 1 << 20);
  int64_t& seed = f.i64("--seed", 0, "seed of the keys, the filler offsets and the lengths before the needle",
                        cli::kAnyInt64Min, cli::kAnyInt64Max);
  int64_t& before = f.i64("--before", 64, "at most this many filler tokens before the needle", 0, cli::kMaxTokens);
  const EngineFlags engine(f);
  std::string& dump =
      f.str("--dump", "", "write one JSON line per trial (distance, trial, key, answer, prompt ids, correct)");
  if (!f.parse(argc, argv)) return 0;
  const std::string dir = model_flag.dir();
  if (filler_file.empty()) throw cli::UsageError("-f/--filler: required");
  const std::vector<int64_t> lengths = parse_lengths(lengths_s);

  const Tokenizer tok = load_model_tokenizer(dir);
  const PasskeyPieces pk(tok);
  const std::vector<int32_t> filler = tok.encode(read_text_file(filler_file, "filler file"));
  ModelOptions mo = engine.options(dir);
  Model model = Model::load(dir, mo);
  const int64_t V = model.vocab();
  for (int64_t d : lengths)
    if (d < pk.min_distance())
      fail("--lengths: ", d, " is shorter than the prompt's fixed pieces (at least ", pk.min_distance(), ")");

  std::ofstream dump_out;
  if (!dump.empty()) {
    dump_out.open(dump, std::ios::trunc);
    if (!dump_out) fail(dump, ": cannot write");
  }
  std::fprintf(stderr, "ksa eval passkey: %s, %s; filler %s (%zu tokens); %lld trials per distance, seed %lld\n",
               dir.c_str(), model.backend_name().c_str(), filler_file.c_str(), filler.size(), (long long)trials,
               (long long)seed);
  std::printf("%9s %8s %7s %9s %9s %14s %14s\n", "distance", "prompt", "trials", "accuracy", "digits", "KV bytes",
              "KV full attn");
  std::vector<float> logits(static_cast<size_t>(V));
  int64_t all_ok = 0, all_n = 0;
  for (int64_t d : lengths) {
    int64_t ok = 0, digits_ok = 0, prompt_len = 0, kv = 0, kv_full = 0;
    for (int64_t t = 0; t < trials; ++t) {
      const PasskeyPrompt p = make_passkey_prompt(pk, filler, d, before, uint64_t(seed), t);
      if (int64_t(p.ids.size()) + kKeyDigits > model.max_text_tokens())
        fail("distance ", d, ": the prompt has ", p.ids.size(), " tokens, past the context limit of ",
             model.max_text_tokens());
      const SeqId seq = model.new_sequence();
      model.append(seq, p.ids, LogitsFor::last, logits);
      prompt_len = std::max<int64_t>(prompt_len, int64_t(p.ids.size()));
      kv = std::max(kv, model.kv_bytes(seq));
      kv_full = std::max(kv_full, model.kv_bytes_full_attention(seq));
      std::vector<int32_t> answer;
      for (int i = 0; i < kKeyDigits; ++i) {
        answer.push_back(argmax(logits));
        if (i + 1 < kKeyDigits) model.append(seq, std::span<const int32_t>(&answer.back(), 1), LogitsFor::last, logits);
      }
      model.release(seq);
      int good = 0;
      for (int i = 0; i < kKeyDigits; ++i) good += answer[size_t(i)] == p.key[size_t(i)];
      digits_ok += good;
      ok += good == kKeyDigits;
      if (dump_out)
        dump_out << "{\"distance\":" << d << ",\"trial\":" << t << ",\"key\":\"" << p.key_text
                 << "\",\"answer\":" << ids_json(answer) << ",\"key_ids\":" << ids_json(p.key)
                 << ",\"needle_at\":" << p.needle_at << ",\"correct\":" << (good == kKeyDigits ? "true" : "false")
                 << ",\"prompt\":" << ids_json(p.ids) << "}\n";
    }
    all_ok += ok;
    all_n += trials;
    std::printf("%9lld %8lld %7lld %9.3f %9.3f %14lld %14lld\n", (long long)d, (long long)prompt_len, (long long)trials,
                double(ok) / double(trials), double(digits_ok) / double(trials * kKeyDigits), (long long)kv,
                (long long)kv_full);
    std::fflush(stdout);
  }
  if (dump_out && !dump_out.flush()) fail(dump, ": write error");
  std::printf("overall accuracy %.3f (%lld / %lld)\n", double(all_ok) / double(all_n), (long long)all_ok,
              (long long)all_n);
  return 0;
}

int run_eval(int argc, char** argv) {
  if (argc >= 1 && std::string(argv[0]) == "passkey") return run_passkey(argc - 1, argv + 1);
  if (argc >= 1 && (std::string(argv[0]) == "-h" || std::string(argv[0]) == "--help")) {
    std::printf(
        "usage: ksa eval <task> [flags]\n\ntasks:\n  passkey      passkey retrieval accuracy per distance (ksa eval "
        "passkey --help)\n");
    return 0;
  }
  throw cli::UsageError(argc >= 1 ? "unknown task '" + std::string(argv[0]) + "' (tasks: passkey)"
                                  : "a task is required (tasks: passkey)");
}

cli::Register reg{{"eval", "evaluate a checkpoint on a task (passkey retrieval)", run_eval}};

}  // namespace
}  // namespace ksa::tools
