// `ksa make-model`: a random-weight checkpoint in the released layout (for tests and tools).
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "common.hpp"
#include "ksa/model_writer.hpp"
#include "ksa/tokenizer.hpp"

namespace ksa::tools {
namespace {

// Where to look for the cached reference tokenizer: the working directory and the executable's folder
// (and their ancestors, e.g. the repository root above build/bin).
std::vector<std::string> search_roots() {
  std::vector<std::string> roots{std::filesystem::current_path().string()};
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) roots.push_back(exe.parent_path().string());
  return roots;
}

int run_make_model(int argc, char** argv) {
  cli::Flags f(
      "make-model",
      "Write a random-weight Qwen3-KSA checkpoint (config.json, safetensors, tokenizer) in the released layout.");
  std::string& shape = f.str("--shape", "tiny", "tiny | small | 4b (KSA-4B-base shapes, about 8 GB in bf16)");
  std::string& out = f.str("-o,--out", "", "output directory (created)");
  int64_t& seed = f.i64("--seed", 0, "random seed", cli::kAnyInt64Min, cli::kAnyInt64Max);
  std::string& dtype = f.str("--dtype", "bf16", "weight dtype: bf16, f16 or f32");
  int64_t& shard_mb = f.i64("--shard-mb", 4096, "shard the weights into files of at most this many MiB", 1, 1 << 30);
  std::string& tok =
      f.str("--tokenizer", "",
            "folder with tokenizer.json (default: $KSA_TOKENIZER_DIR, else the cache of scripts/fetch_test_data.sh)");
  bool& no_sum = f.flag("--no-summary-proj", "do not write *_proj_summary tensors (the default for --shape 4b)");
  if (!f.parse(argc, argv)) return 0;
  if (out.empty()) throw cli::UsageError("--out: required");

  const ModelConfig cfg = model_shape_config(shape);
  RandomModelOptions opt;
  opt.seed = uint64_t(seed);
  opt.dtype = parse_dtype_flag(dtype);
  opt.max_shard_bytes = shard_mb << 20;
  opt.summary_projections = !no_sum && shape != "4b";
  opt.tokenizer_dir = tok;
  if (opt.tokenizer_dir.empty()) {  // $KSA_TOKENIZER_DIR, else the cache of scripts/fetch_test_data.sh
    const char* env = std::getenv("KSA_TOKENIZER_DIR");
    opt.tokenizer_dir = env && *env && std::filesystem::exists(std::filesystem::path(env) / "tokenizer.json")
                            ? std::string(env)
                            : find_reference_tokenizer(search_roots());
  }

  const double t0 = now_s();
  const WrittenModel w = write_random_model(cfg, out, opt);
  std::printf("wrote %s model (%lld parameters, %s of weights) to %s in %.1f s:\n", shape.c_str(),
              (long long)w.parameters, human_bytes(double(w.bytes)).c_str(), out.c_str(), now_s() - t0);
  for (const std::string& p : w.files) std::printf("  %s\n", p.c_str());
  if (w.tokenizer_copied) {
    std::printf("tokenizer: copied from %s\n", opt.tokenizer_dir.c_str());
  } else {
    std::fprintf(stderr,
                 "ksa make-model: warning: no tokenizer copied: the reference tokenizer is not in the cache "
                 "(run scripts/fetch_test_data.sh, set KSA_TOKENIZER_DIR, or pass --tokenizer DIR)\n");
  }
  return 0;
}

cli::Register reg{{"make-model", "write a random-weight checkpoint (tests, tools)", run_make_model}};

}  // namespace
}  // namespace ksa::tools
