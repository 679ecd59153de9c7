// Helpers shared by the tests of several layers: the message of the ksa::Error a call throws, and a
// scratch directory removed when the test ends.
#pragma once
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <system_error>

#include "ksa/error.hpp"

namespace ksa::test {

// What error_of returns when the call throws nothing.
inline constexpr const char* kNoError = "(no error)";

// The message of the ksa::Error that f throws, or kNoError.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return kNoError;
}

// Runs a shell command; returns its stdout and stderr together, and its wait status in *status.
inline std::string run_command(const std::string& cmd, int* status) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  *status = pclose(p);
  return out;
}

// A fresh directory under the system temp dir (name: ksa_<tag>_<pid>_<n>), removed with its contents on
// destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : dir_(std::filesystem::temp_directory_path() /
             ("ksa_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++))) {
    std::filesystem::create_directories(dir_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& dir() const { return dir_; }
  std::string str() const { return dir_.string(); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  static inline int counter_ = 0;
  std::filesystem::path dir_;
};

}  // namespace ksa::test
