// Helpers shared by the ksa subcommands.
#pragma once
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cli.hpp"
#include "core/splitmix.hpp"
#include "ksa/dtype.hpp"
#include "ksa/error.hpp"
#ifdef KSA_HAVE_ENGINE
#include "ksa/model.hpp"
#endif

namespace ksa::tools {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// "8/2" -> {8, 2}; "8" -> {8, 8}.
inline void parse_heads(const std::string& s, int64_t& hq, int64_t& hkv) {
  try {
    const size_t slash = s.find('/');
    hq = std::stoll(s.substr(0, slash));
    hkv = slash == std::string::npos ? hq : std::stoll(s.substr(slash + 1));
  } catch (const std::exception&) {
    throw cli::UsageError("--heads: expected Hq/Hkv such as 32/8 (got '" + s + "')");
  }
  if (hq < 1 || hkv < 1 || hq % hkv)
    throw cli::UsageError("--heads: Hq must be a positive multiple of Hkv (got '" + s + "')");
}

inline DType parse_dtype_flag(const std::string& s) {
  DType t;
  if (!parse_dtype(s, t)) throw cli::UsageError("--dtype: expected f32, bf16 or f16 (got '" + s + "')");
  return t;
}

// n values ~ normal(0, sd) in dtype t. Element i comes from a counter-based generator (element i of the
// splitmix64 stream seeded with one draw from rng; Box-Muller), so the data are a function of rng's state alone
// and are filled by all hardware threads: the GPU benches' 128K-token inputs (~1.5 G values) take seconds.
inline std::vector<uint8_t> random_tensor(DType t, int64_t n, std::mt19937_64& rng, float sd = 1.f) {
  std::vector<uint8_t> buf(size_t(n * dtype_size(t)));
  const uint64_t seed = rng();
  auto fill = [&buf, t, sd, seed](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const uint64_t x = detail::splitmix64(seed + uint64_t(i) * 0x9e3779b97f4a7c15ull);
      const float u1 = float((x >> 40) + 1) * 0x1p-24f;          // (0, 1]
      const float u2 = float((x >> 16) & 0xFFFFFFu) * 0x1p-24f;  // [0, 1)
      store_from_float(t, buf.data(), i, sd * std::sqrt(-2.f * std::log(u1)) * std::cos(6.28318530718f * u2));
    }
  };
  const int64_t threads = std::clamp<int64_t>(int64_t(std::thread::hardware_concurrency()), 1, 64);
  if (threads == 1 || n < (int64_t(1) << 20)) {
    fill(0, n);
    return buf;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < threads; ++w) pool.emplace_back(fill, n * w / threads, n * (w + 1) / threads);
  for (std::thread& th : pool) th.join();
  return buf;
}

inline std::string human_bytes(double b);

// The KV-cache line of a sequence: "<kv> (KSA) vs <full> full attention: 2.54x smaller". Never claims a saving
// that is not there: a plain model (no summaries) caches full attention; a KSA text shorter than its window
// (or a short text, where the cache's blocks round up) saves nothing.
inline std::string kv_comparison(int64_t kv, int64_t full, bool ksa) {
  std::string s = human_bytes(double(kv));
  if (!ksa) return s + " (full attention: the model has no summary tokens)";
  s += " (KSA) vs " + human_bytes(double(full)) + " full attention";
  if (kv > 0 && full > kv) {
    char buf[48];
    std::snprintf(buf, sizeof buf, ": %.2fx smaller", double(full) / double(kv));
    return s + buf;
  }
  return s + ": no saving at this length (the window still covers the text; the cache rounds up to whole blocks)";
}

// -m: a checkpoint directory, or a file in it (config.json, a .safetensors file, tokenizer.json) standing for
// its folder.
inline std::string model_dir_arg(const std::string& m) {
  std::error_code ec;
  if (m.empty() || !std::filesystem::is_regular_file(m, ec)) return m;
  const std::filesystem::path parent = std::filesystem::path(m).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// The required -m/--model flag of the commands that load a checkpoint; dir() (after parsing) is its directory.
struct ModelDirFlag {
  std::string& arg;

  explicit ModelDirFlag(cli::Flags& f)
      : arg(f.str("-m,--model", "",
                  "checkpoint directory (config.json, safetensors, tokenizer.json), or a file in it")) {}

  std::string dir() const {
    std::string d = model_dir_arg(arg);
    if (d.empty()) throw cli::UsageError("-m/--model: required");
    return d;
  }
};

#ifdef KSA_HAVE_ENGINE
// --device: "cpu", "cuda", or "auto" (cuda when the build has the CUDA engine, a GPU is visible and the
// model in `dir` has a head dim the CUDA engine takes and no q8_0 weights).
inline Device parse_device_flag(const std::string& s, const std::string& dir) {
  if (s == "cpu") return Device::cpu;
  if (s == "cuda") {
    if (!cuda_engine_available())
      fail(
          "--device cuda: no CUDA device is visible, or this build has no CUDA engine (see `ksa info`); use --device "
          "cpu");
    return Device::cuda;
  }
  if (s == "auto" || s.empty()) return default_device(dir);
  throw cli::UsageError("--device: must be cpu, cuda or auto (got \"" + s + "\")");
}
#endif

#ifdef KSA_HAVE_ENGINE
// The CUDA engine's tuning flags of `ksa generate` and `ksa bench model` (one wording for both); apply() after
// parsing copies them into the model's options.
struct CudaEngineFlags {
  bool& no_graphs;
  bool& no_ahead;
  int64_t& ubatch;

  explicit CudaEngineFlags(cli::Flags& f)
      : no_graphs(
            f.flag("--no-cuda-graphs", "CUDA: launch every kernel of every step (no graph replay of decode steps)")),
        no_ahead(f.flag("--no-plan-ahead", "CUDA: plan each decode step when it starts (not during the step before)")),
        ubatch(f.i64("-ub,--ubatch-size", 0,
                     "CUDA: prompt tokens per prefill piece (0 = the engine's " +
                         std::to_string(ModelOptions::kDefaultPrefillTokens) +
                         "; larger pieces prefill a long prompt faster and take more device memory)",
                     0, cli::kMaxTokens)) {}

  void apply(ModelOptions& mo) const {
    mo.cuda_graphs = !no_graphs;
    mo.cuda_plan_ahead = !no_ahead;
    mo.prefill_tokens = ubatch;
  }
};
#endif

inline std::string human_bytes(double b) {
  const char* u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (b >= 1024 && i < 4) {
    b /= 1024;
    ++i;
  }
  char s[64];
  std::snprintf(s, sizeof s, "%.2f %s", b, u[i]);
  return s;
}

// A progress callback for ksa::ModelOptions::progress (weights paged in): a bar redrawn in place when stderr
// is a terminal and the weights are at least 64 MiB; a line per quarter when stderr is not a terminal and the
// weights are at least 1 GiB (logs of long loads); nothing otherwise.
inline std::function<void(int64_t, int64_t)> weight_progress() {
  const bool tty = isatty(STDERR_FILENO) != 0;
  auto quarter = std::make_shared<int>(0);
  return [tty, quarter](int64_t done, int64_t total) {
    if (total <= 0) return;
    const double frac = double(done) / double(total);
    if (tty && total >= (int64_t(64) << 20)) {
      constexpr int width = 40;
      const int fill = int(frac * width + 0.5);
      std::fprintf(stderr, "\rloading weights [%s%s] %3d%% %s / %s", std::string(size_t(fill), '#').c_str(),
                   std::string(size_t(width - fill), ' ').c_str(), int(frac * 100 + 0.5),
                   human_bytes(double(done)).c_str(), human_bytes(double(total)).c_str());
      if (done >= total) std::fputc('\n', stderr);
      std::fflush(stderr);
    } else if (!tty && total >= (int64_t(1) << 30)) {
      while (*quarter < 4 && frac >= 0.25 * (*quarter + 1)) {
        ++*quarter;
        std::fprintf(stderr, "loading weights: %d%% of %s\n", 25 * *quarter, human_bytes(double(total)).c_str());
      }
    }
  };
}

}  // namespace ksa::tools
