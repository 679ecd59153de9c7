// ksa::Error: every library error. It says what was wrong and with which value; the library never exits.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace ksa {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// Throws ksa::Error built from the streamed arguments.
template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(detail::cat(args...));
}

// Field check used by every validate(): "field: must be <what> (got <value>)".
template <class T>
void require(bool ok, const char* field, const char* what, const T& value) {
  if (!ok) fail(field, ": must be ", what, " (got ", value, ")");
}

}  // namespace ksa
