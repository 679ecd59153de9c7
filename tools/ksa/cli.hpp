// The `ksa` command's small framework: subcommands register themselves (one cmd_*.cpp file each) and
// declare their flags, which gives `--help` text and strict parsing (an unknown flag is exit code 2).
#pragma once
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

class Flags {
 public:
  Flags(std::string command, std::string summary) : command_(std::move(command)), summary_(std::move(summary)) {}

  // Declare flags. `names` is "--long" or "-s,--long". The returned reference receives the parsed value.
  std::string& str(const std::string& names, std::string def, const std::string& help);
  int64_t& i64(const std::string& names, int64_t def, const std::string& help);
  double& f64(const std::string& names, double def, const std::string& help);
  bool& flag(const std::string& names, const std::string& help);
  // A string flag that may be given several times; every value is kept, in order.
  std::vector<std::string>& strs(const std::string& names, const std::string& help);

  // Parses argv[0..argc) (the words after the subcommand). Returns false when --help was asked (help is
  // printed). Throws UsageError for unknown flags, missing or malformed values.
  bool parse(int argc, char** argv);
  // Whether the user gave this flag explicitly.
  bool given(const std::string& long_name) const;
  std::string help() const;

 private:
  enum class Kind { str, i64, f64, flag, strs };
  struct Flag {
    std::vector<std::string> names;
    std::string help, def;
    Kind kind;
    std::string s;
    int64_t i = 0;
    double f = 0;
    bool b = false;
    std::vector<std::string> list;
    bool seen = false;
  };
  Flag& add(const std::string& names, Kind kind, std::string def, const std::string& help);
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

}  // namespace ksa::cli
