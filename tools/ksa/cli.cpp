#include "cli.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <sstream>

namespace ksa::cli {
namespace {
std::vector<Command>& registry() {
  static std::vector<Command> r;
  return r;
}
std::vector<std::string> split_names(const std::string& names) {
  std::vector<std::string> out;
  std::stringstream ss(names);
  std::string n;
  while (std::getline(ss, n, ',')) out.push_back(n);
  return out;
}
}  // namespace

Register::Register(Command c) { registry().push_back(std::move(c)); }

const char* version() {
#ifdef KSA_VERSION_STRING
  return KSA_VERSION_STRING;
#else
  return "0+unknown";
#endif
}

std::string closest(const std::string& word, const std::vector<std::string>& candidates) {
  // Optimal string alignment distance.
  auto dist = [](const std::string& a, const std::string& b) {
    const size_t n = a.size(), m = b.size();
    std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1));
    for (size_t i = 0; i <= n; ++i) d[i][0] = i;
    for (size_t j = 0; j <= m; ++j) d[0][j] = j;
    for (size_t i = 1; i <= n; ++i)
      for (size_t j = 1; j <= m; ++j) {
        const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
        d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
        if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
          d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    return d[n][m];
  };
  std::string bare = word;
  while (!bare.empty() && bare[0] == '-') bare.erase(0, 1);
  const size_t limit = bare.size() <= 4 ? 1 : bare.size() <= 8 ? 2 : 3;
  std::string best;
  size_t best_d = limit + 1;
  for (const std::string& c : candidates) {
    if (c == word) continue;
    const size_t d = dist(word, c);
    if (d < best_d) best_d = d, best = c;
  }
  return best;
}

std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates) {
  const std::string c = closest(word, candidates);
  return c.empty() ? std::string() : " (did you mean '" + c + "'?)";
}
const std::vector<Command>& commands() { return registry(); }

Flags::Flag& Flags::add(const std::string& names, Kind kind, std::string def, const std::string& help) {
  auto f = std::make_unique<Flag>();
  f->names = split_names(names);
  f->help = help;
  f->def = std::move(def);
  f->kind = kind;
  flags_.push_back(std::move(f));
  return *flags_.back();
}

std::string& Flags::str(const std::string& names, std::string def, const std::string& help) {
  Flag& f = add(names, Kind::str, def, help);
  f.s = def;
  return f.s;
}
int64_t& Flags::i64(const std::string& names, int64_t def, const std::string& help, int64_t min, int64_t max) {
  Flag& f = add(names, Kind::i64, std::to_string(def), help);
  f.i = def;
  f.i_min = min;
  f.i_max = max;
  return f.i;
}
double& Flags::f64(const std::string& names, double def, const std::string& help, double min, double max) {
  std::ostringstream os;
  os << def;
  Flag& f = add(names, Kind::f64, os.str(), help);
  f.f = def;
  f.f_min = min;
  f.f_max = max;
  return f.f;
}
bool& Flags::flag(const std::string& names, const std::string& help) {
  Flag& f = add(names, Kind::flag, "", help);
  return f.b;
}
std::vector<std::string>& Flags::strs(const std::string& names, const std::string& help) {
  Flag& f = add(names, Kind::strs, "", help);
  return f.list;
}
std::vector<int64_t>& Flags::i64s(const std::string& names, std::vector<int64_t> def, const std::string& help,
                                  int64_t min, int64_t max) {
  std::string d;
  for (int64_t v : def) {
    if (!d.empty()) d += ',';
    d += std::to_string(v);
  }
  Flag& f = add(names, Kind::i64s, d, help);
  f.ints = std::move(def);
  f.i_min = min;
  f.i_max = max;
  return f.ints;
}

Flags::Flag* Flags::find(const std::string& name) {
  for (auto& f : flags_)
    for (auto& n : f->names)
      if (n == name) return f.get();
  return nullptr;
}

bool Flags::given(const std::string& long_name) const {
  for (auto& f : flags_)
    for (auto& n : f->names)
      if (n == long_name) return f->seen;
  return false;
}

bool Flags::parse(int argc, char** argv) {
  for (int a = 0; a < argc; ++a) {
    std::string w = argv[a];
    if (w == "-h" || w == "--help") {
      std::fputs(help().c_str(), stdout);
      return false;
    }
    std::string value;
    bool has_value = false;
    if (w.rfind("--", 0) == 0) {
      const size_t eq = w.find('=');
      if (eq != std::string::npos) {
        value = w.substr(eq + 1);
        w = w.substr(0, eq);
        has_value = true;
      }
    } else if (w.empty() || w[0] != '-') {
      throw UsageError("unexpected argument '" + w + "'");
    }
    Flag* f = find(w);
    if (!f) {
      std::vector<std::string> names;
      for (const auto& fl : flags_) names.insert(names.end(), fl->names.begin(), fl->names.end());
      throw UsageError("unknown flag '" + w + "'" + did_you_mean(w, names));
    }
    f->seen = true;
    if (f->kind == Kind::flag) {
      if (has_value) throw UsageError("flag '" + w + "' takes no value");
      f->b = true;
      continue;
    }
    if (!has_value) {
      if (a + 1 >= argc) throw UsageError("flag '" + w + "' needs a value");
      value = argv[++a];
    }
    if (f->kind == Kind::str) f->s = value;
    else if (f->kind == Kind::strs) f->list.push_back(value);
    else if (f->kind == Kind::i64s) {
      if (f->list.empty()) f->ints.clear();  // the first value given replaces the default list
      f->list.push_back(value);              // the values as given
      std::stringstream ss(value);
      std::string item;
      bool any = false;
      while (std::getline(ss, item, ',')) f->ints.push_back(parse_i64(w, item, f->i_min, f->i_max)), any = true;
      if (!any || value.back() == ',') throw UsageError("flag '" + w + "': '" + value + "' is not a list of integers");
    } else if (f->kind == Kind::i64) f->i = parse_i64(w, value, f->i_min, f->i_max);
    else if (f->kind == Kind::f64) f->f = parse_f64(w, value, f->f_min, f->f_max);
  }
  return true;
}

namespace {
// "in [0, 1024]", or ">= -1" / "<= 5" when a side is unbounded.
template <class T>
std::string range_text(T min, T max) {
  std::ostringstream os;
  if (min == std::numeric_limits<T>::lowest() && max == std::numeric_limits<T>::max()) os << "a finite number";
  else if (max == std::numeric_limits<T>::max()) os << ">= " << min;
  else if (min == std::numeric_limits<T>::lowest()) os << "<= " << max;
  else os << "in [" << min << ", " << max << "]";
  return os.str();
}
template <class T>
UsageError out_of_range(const std::string& flag, const std::string& value, T min, T max) {
  return UsageError("flag '" + flag + "': " + value + " is out of range (must be " + range_text(min, max) + ")");
}
}  // namespace

int64_t Flags::parse_i64(const std::string& flag, const std::string& value, int64_t min, int64_t max) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(value, &used, 0);
  } catch (const std::out_of_range&) {
    throw out_of_range(flag, value, min, max);
  } catch (const std::exception&) {
    used = std::string::npos;
  }
  if (used != value.size() || value.empty() || std::isspace(static_cast<unsigned char>(value[0])))
    throw UsageError("flag '" + flag + "': '" + value + "' is not a valid integer");
  if (v < min || v > max) throw out_of_range(flag, value, min, max);
  return v;
}

double Flags::parse_f64(const std::string& flag, const std::string& value, double min, double max) {
  // strtod, not stod: a value too small for a double (1e-999) is 0, as in Python; too large is out of range.
  char* end = nullptr;
  errno = 0;
  const double v =
      value.empty() || std::isspace(static_cast<unsigned char>(value[0])) ? 0 : std::strtod(value.c_str(), &end);
  if (end != value.c_str() + value.size() || (!std::isfinite(v) && errno != ERANGE))
    throw UsageError("flag '" + flag + "': '" + value + "' is not a valid number");
  if (!std::isfinite(v) || v < min || v > max) throw out_of_range(flag, value, min, max);
  return v;
}

std::string Flags::help() const {
  std::ostringstream os;
  os << "usage: ksa " << command_ << " [flags]\n\n" << summary_ << "\n\nflags:\n";
  for (auto& f : flags_) {
    std::string names;
    for (size_t i = 0; i < f->names.size(); ++i) names += (i ? ", " : "") + f->names[i];
    if (f->kind != Kind::flag)
      names += f->kind == Kind::str || f->kind == Kind::strs ? " STR"
               : f->kind == Kind::i64                        ? " N"
               : f->kind == Kind::i64s                       ? " N[,N...]"
                                                             : " X";
    os << "  " << names;
    const int pad = 28 - int(names.size());
    os << std::string(size_t(pad > 1 ? pad : 1), ' ') << f->help;
    if (f->kind != Kind::flag && !f->def.empty()) {
      os << " (default: " << f->def;
      if ((f->kind == Kind::i64 || f->kind == Kind::i64s) && (f->i_min != kAnyInt64Min || f->i_max != kAnyInt64Max))
        os << ", " << range_text(f->i_min, f->i_max);
      if (f->kind == Kind::f64 && (f->f_min != -DBL_MAX || f->f_max != DBL_MAX))
        os << ", " << range_text(f->f_min, f->f_max);
      os << ")";
    }
    if (f->kind == Kind::strs) os << " (repeatable)";
    os << "\n";
  }
  os << "  -h, --help" << std::string(18, ' ') << "show this help\n";
  return os.str();
}

}  // namespace ksa::cli
