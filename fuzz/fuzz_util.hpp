// Shared by the libFuzzer harnesses (docs/testing.md). A harness feeds its input to one reader and catches
// ksa::Error only: any other exception, a crash, a sanitizer report, a hang or runaway memory is a finding.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "ksa/error.hpp"

namespace ksa::fuzz {

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs f and swallows ksa::Error, the library's one way to reject input.
template <class F>
void expect_only_ksa_errors(F&& f) {
  try {
    f();
  } catch (const Error&) {}
}

// An in-memory file holding `bytes`, for readers that take a path (safetensors mmap, tokenizer_config.json):
// a memfd, named /proc/self/fd/N, reused across runs.
class MemFile {
 public:
  explicit MemFile(const char* name) : fd_(memfd_create(name, 0)) {
    if (fd_ < 0) std::abort();
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { close(fd_); }
  const std::string& write(std::string_view bytes) {
    if (ftruncate(fd_, 0) != 0 || pwrite(fd_, bytes.data(), bytes.size(), 0) != ssize_t(bytes.size())) std::abort();
    return path_;
  }

 private:
  int fd_;
  std::string path_;
};

}  // namespace ksa::fuzz
