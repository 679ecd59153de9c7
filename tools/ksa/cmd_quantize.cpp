// `ksa quantize`: a checkpoint with 8-bit (Q8_0) weight matrices, which the CPU engine runs directly
// (docs/quantization.md).
#include <cstdio>

#include "common.hpp"
#include "ksa/quantize.hpp"

namespace ksa::tools {
namespace {

int run_quantize(int argc, char** argv) {
  cli::Flags f("quantize",
               "Write a copy of a checkpoint with its weight matrices in 8 bits (q8_0: blocks of 32 weights, an fp16\n"
               "scale and 32 int8, 8.5 bits per weight; docs/quantization.md), which the CPU engine reads in place.\n"
               "Norms stay as they are; config.json, the tokenizer and other non-weight files are copied.");
  std::string& model = f.str("-m,--model", "", "checkpoint directory to read (or a file in it)");
  std::string& type = f.str("--type", "q8_0", "quantisation type: q8_0");
  std::string& out = f.str("-o,--out", "", "output directory (created; must not be the input's)");
  int64_t& shard_mb = f.i64("--shard-mb", 4096, "shard the output into files of at most this many MiB", 1, 1 << 30);
  bool& quiet = f.flag("-q,--quiet", "no line per tensor (only the files copied and the sizes)");
  if (!f.parse(argc, argv)) return 0;
  if (model.empty()) throw cli::UsageError("-m/--model: required");
  if (out.empty()) throw cli::UsageError("-o/--out: required");
  if (type != "q8_0") throw cli::UsageError("--type: must be q8_0 (got '" + type + "')");
  const std::string dir = model_dir_arg(model);

  QuantizeOptions opt;
  opt.type = type;
  opt.max_shard_bytes = shard_mb << 20;
  if (!quiet)
    opt.progress = [](const QuantizedTensor& t) {
      std::string shape = "[";
      for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
      shape += "]";
      const int width = int(std::to_string(t.count).size());
      std::printf("[%*lld/%lld] %-50s %-14s %-4s -> %-4s %10s -> %10s%s%s\n", width, (long long)(t.index + 1),
                  (long long)t.count, t.name.c_str(), shape.c_str(), dtype_name(t.from), dtype_name(t.to),
                  human_bytes(double(t.bytes_in)).c_str(), human_bytes(double(t.bytes_out)).c_str(),
                  t.kept_because.empty() ? "" : "  kept: ", t.kept_because.c_str());
      std::fflush(stdout);
    };
  const double t0 = now_s();
  const QuantizeReport r = quantize_checkpoint(dir, out, opt);
  for (const std::string& k : r.kept) std::fprintf(stderr, "ksa quantize: warning: kept %s\n", k.c_str());
  std::string copied;
  for (const std::string& c : r.copied) copied += (copied.empty() ? "" : ", ") + c;
  std::printf("copied: %s\n", copied.empty() ? "nothing" : copied.c_str());
  std::printf(
      "ksa quantize: %s -> %s: %lld of %lld tensors to %s; weights %s -> %s (%.1f%%), the quantised matrices "
      "%s -> %s (%.1f%%); %zu file%s in %.1f s\n",
      dir.c_str(), out.c_str(), (long long)r.quantized, (long long)r.tensors, type.c_str(),
      human_bytes(double(r.bytes_in)).c_str(), human_bytes(double(r.bytes_out)).c_str(),
      100.0 * double(r.bytes_out) / double(std::max<int64_t>(1, r.bytes_in)),
      human_bytes(double(r.matrix_bytes_in)).c_str(), human_bytes(double(r.matrix_bytes_out)).c_str(),
      100.0 * double(r.matrix_bytes_out) / double(std::max<int64_t>(1, r.matrix_bytes_in)), r.files.size(),
      r.files.size() == 1 ? "" : "s", now_s() - t0);
  return 0;
}

cli::Register reg{{"quantize", "write a checkpoint with 8-bit (q8_0) weight matrices (CPU engine)", run_quantize}};

}  // namespace
}  // namespace ksa::tools
