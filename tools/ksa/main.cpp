// ksa: Kwai Summary Attention in C++. `ksa --help` lists the subcommands; `ksa CMD --help` their flags.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "cli.hpp"
#include "ksa/dense.hpp"
#include "ksa/error.hpp"

namespace {
void usage(FILE* out) {
  std::fprintf(out, "usage: ksa <command> [flags]\n\nKwai Summary Attention (KSA) in C++.\n\ncommands:\n");
  auto cmds = ksa::cli::commands();
  std::sort(cmds.begin(), cmds.end(), [](auto& a, auto& b) { return a.name < b.name; });
  for (auto& c : cmds) std::fprintf(out, "  %-12s %s\n", c.name.c_str(), c.summary.c_str());
  std::fprintf(out, "\nRun 'ksa <command> --help' for the flags of a command; 'ksa --version' for the version.\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    usage(stdout);
    return 0;
  }
  if (cmd == "-V" || cmd == "--version" || cmd == "version") {
    std::printf("ksa %s\n", ksa::cli::version());
    return 0;
  }
  for (auto& c : ksa::cli::commands()) {
    if (c.name != cmd) continue;
    try {
      // KSA_CPU_PRIMITIVES=portable|AVX2|AVX3|...: the CPU kernels' SIMD target (docs/benchmarks.md)
      if (const char* simd = std::getenv("KSA_CPU_PRIMITIVES"); simd && *simd) ksa::cpu::set_simd_target(simd);
      // KSA_CPU_BF16_DOT=0: products with bf16 weights through widened weights and sgemm even where the CPU
      // has bf16 dot products (ksa::cpu::bf16_products)
      if (const char* dot = std::getenv("KSA_CPU_BF16_DOT"); dot && std::string_view(dot) == "0")
        ksa::cpu::set_bf16_products(false);
      return c.run(argc - 2, argv + 2);
    } catch (const ksa::cli::UsageError& e) {
      std::fprintf(stderr, "ksa %s: %s\nRun 'ksa %s --help' for usage.\n", cmd.c_str(), e.what(), cmd.c_str());
      return 2;
    } catch (const ksa::Error& e) {
      std::fprintf(stderr, "ksa %s: error: %s\n", cmd.c_str(), e.what());
      return 1;
    } catch (const std::filesystem::filesystem_error& e) {
      // A path the command itself stats (a name over NAME_MAX, a symlink loop): the message names it.
      std::fprintf(stderr, "ksa %s: error: %s\n", cmd.c_str(), e.what());
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "ksa %s: unexpected error: %s\n", cmd.c_str(), e.what());
      return 1;
    }
  }
  std::vector<std::string> names;
  for (auto& c : ksa::cli::commands()) names.push_back(c.name);
  std::fprintf(stderr, "ksa: unknown command '%s'%s\n\n", cmd.c_str(), ksa::cli::did_you_mean(cmd, names).c_str());
  usage(stderr);
  return 2;
}
