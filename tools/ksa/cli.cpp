#include "cli.hpp"

#include <cstdio>
#include <cstdlib>
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
int64_t& Flags::i64(const std::string& names, int64_t def, const std::string& help) {
  Flag& f = add(names, Kind::i64, std::to_string(def), help);
  f.i = def;
  return f.i;
}
double& Flags::f64(const std::string& names, double def, const std::string& help) {
  std::ostringstream os;
  os << def;
  Flag& f = add(names, Kind::f64, os.str(), help);
  f.f = def;
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
    if (!f) throw UsageError("unknown flag '" + w + "'");
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
    try {
      size_t used = 0;
      switch (f->kind) {
        case Kind::str: f->s = value; used = value.size(); break;
        case Kind::strs: f->list.push_back(value); used = value.size(); break;
        case Kind::i64: f->i = std::stoll(value, &used, 0); break;
        case Kind::f64: f->f = std::stod(value, &used); break;
        case Kind::flag: break;
      }
      if (used != value.size()) throw std::invalid_argument("trailing");
    } catch (const std::exception&) {
      throw UsageError("flag '" + w + "': '" + value + "' is not a valid " +
                       (f->kind == Kind::i64 ? "integer" : "number"));
    }
  }
  return true;
}

std::string Flags::help() const {
  std::ostringstream os;
  os << "usage: ksa " << command_ << " [flags]\n\n" << summary_ << "\n\nflags:\n";
  for (auto& f : flags_) {
    std::string names;
    for (size_t i = 0; i < f->names.size(); ++i) names += (i ? ", " : "") + f->names[i];
    if (f->kind != Kind::flag) names += f->kind == Kind::str || f->kind == Kind::strs ? " STR" : f->kind == Kind::i64 ? " N" : " X";
    os << "  " << names;
    const int pad = 28 - int(names.size());
    os << std::string(size_t(pad > 1 ? pad : 1), ' ') << f->help;
    if (f->kind != Kind::flag && !f->def.empty()) os << " (default: " << f->def << ")";
    if (f->kind == Kind::strs) os << " (repeatable)";
    os << "\n";
  }
  os << "  -h, --help" << std::string(18, ' ') << "show this help\n";
  return os.str();
}

}  // namespace ksa::cli
