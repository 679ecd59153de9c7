// The `ksa` command's small framework: subcommands register themselves (one cmd_*.cpp file each) and
// declare their flags, which gives `--help` text and strict parsing (an unknown flag is exit code 2).
#pragma once
#include <cfloat>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ksa::cli {

// A bad command line: printed with a hint, exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Common bounds of integer flags.
inline constexpr int64_t kMaxThreads = 1024;                                  // -t/--threads (0 = all cores)
inline constexpr int64_t kMaxTokens = (int64_t(1) << 31) - 1;                 // token counts: the KV cache's limit
inline constexpr int64_t kAnyInt64Min = INT64_MIN, kAnyInt64Max = INT64_MAX;  // seeds: every value is fine

// Help of --no-mmap, which every command that loads a model for the CPU takes (ModelOptions::load).
inline constexpr const char* kNoMmapHelp =
    "CPU: copy the weights into anonymous memory in 2 MiB pages instead of mapping the checkpoint (decode then "
    "does not depend on how the page cache holds the file; costs the copy at load and the weights' size in "
    "memory; docs/quantization.md)";
// Help of --gemm-autotune (ksa bench model, ksa serve): ModelOptions::cuda_gemm_autotune.
inline constexpr const char* kGemmAutotuneHelp =
    "CUDA: time cuBLASLt's candidates per product class at its first use and run the fastest";

class Flags {
 public:
  Flags(std::string command, std::string summary) : command_(std::move(command)), summary_(std::move(summary)) {}

  // Declare flags. `names` is "--long" or "-s,--long". The returned reference receives the parsed value.
  std::string& str(const std::string& names, std::string def, const std::string& help);
  // An integer in [min, max] (decimal, or 0x hex): every integer flag states its range, and a value outside
  // it (or beyond int64) is a UsageError naming the flag and the range, before any code sees the value.
  int64_t& i64(const std::string& names, int64_t def, const std::string& help, int64_t min, int64_t max);
  // A finite number in [min, max] (inf and nan are refused).
  double& f64(const std::string& names, double def, const std::string& help, double min = -DBL_MAX,
              double max = DBL_MAX);
  bool& flag(const std::string& names, const std::string& help);
  // A string flag that may be given several times; every value is kept, in order.
  std::vector<std::string>& strs(const std::string& names, const std::string& help);
  // Integers in [min, max], comma-separated ("512,4096") and/or repeated (llama-bench's lists); the first
  // value given replaces the default list.
  std::vector<int64_t>& i64s(const std::string& names, std::vector<int64_t> def, const std::string& help, int64_t min,
                             int64_t max);

  // Parses argv[0..argc) (the words after the subcommand). Returns false when --help was asked (help is
  // printed). Throws UsageError for unknown flags, missing or malformed values.
  bool parse(int argc, char** argv);
  // Whether the user gave this flag explicitly.
  bool given(const std::string& long_name) const;
  std::string help() const;

 private:
  enum class Kind { str, i64, f64, flag, strs, i64s };
  struct Flag {
    std::vector<std::string> names;
    std::string help, def;
    Kind kind;
    std::string s;
    int64_t i = 0, i_min = 0, i_max = 0;
    double f = 0, f_min = 0, f_max = 0;
    bool b = false;
    std::vector<std::string> list;
    std::vector<int64_t> ints;
    bool seen = false;
  };
  Flag& add(const std::string& names, Kind kind, std::string def, const std::string& help);
  static int64_t parse_i64(const std::string& flag, const std::string& value, int64_t min, int64_t max);
  static double parse_f64(const std::string& flag, const std::string& value, double min, double max);
  Flag* find(const std::string& name);
  std::string command_, summary_;
  std::vector<std::unique_ptr<Flag>> flags_;
};

struct Command {
  std::string name, summary;
  std::function<int(int, char**)> run;  // words after the subcommand; returns the exit code
};

// Static registration: `static ksa::cli::Register reg{{"demo", "...", run_demo}};` in a cmd_*.cpp file.
struct Register {
  explicit Register(Command c);
};
const std::vector<Command>& commands();

// The candidate closest to `word` by edit distance (insertions, deletions, substitutions, transpositions of
// neighbours), if it is close enough to be a likely typo (at most 1 edit for words of up to 4 letters, 2
// up to 8, 3 beyond); else "".
std::string closest(const std::string& word, const std::vector<std::string>& candidates);
// " (did you mean 'X'?)" for closest(word, candidates), or "".
std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates);

// The project version (CMake's project(VERSION)).
const char* version();

}  // namespace ksa::cli
