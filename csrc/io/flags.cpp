#include "csrc/io/flags.h"

#include <toml++/toml.h>

#include <sstream>

#include "csrc/common/error.h"
#include "csrc/common/text.h"

namespace bpt::io {

void FlagSet::add(std::string name, std::string help, Setter set, Getter get) {
  flags_.push_back({std::move(name), std::move(help), std::move(set), std::move(get)});
}

void FlagSet::add(std::string name, std::string help, std::string* target) {
  add(std::move(name), std::move(help), [target](const std::string& v) { *target = v; }, [target] { return *target; });
}

void FlagSet::add(std::string name, std::string help, int64_t* target) {
  const std::string field = name;
  add(std::move(name), std::move(help), [target, field](const std::string& v) { *target = parse_int(v, field); },
      [target] { return std::to_string(*target); });
}

void FlagSet::add(std::string name, std::string help, double* target) {
  const std::string field = name;
  add(std::move(name), std::move(help), [target, field](const std::string& v) { *target = parse_double(v, field); },
      [target] { return fmt::format("{}", *target); });
}

void FlagSet::add(std::string name, std::string help, bool* target) {
  const std::string field = name;
  add(std::move(name), std::move(help), [target, field](const std::string& v) { *target = parse_bool(v, field); },
      [target] { return std::string(*target ? "true" : "false"); });
  flags_.back().is_bool = true;
}

void FlagSet::add_prefix(std::string prefix, std::string help,
                         std::function<void(const std::string&, const std::string&)> set,
                         std::function<std::vector<std::pair<std::string, std::string>>()> fields) {
  prefixes_.push_back({std::move(prefix), std::move(help), std::move(set), std::move(fields)});
}

const FlagSet::Flag* FlagSet::find(const std::string& name) const {
  for (const Flag& flag : flags_) {
    if (flag.name == name) return &flag;
  }
  return nullptr;
}

std::vector<std::string> FlagSet::known_names() const {
  std::vector<std::string> names;
  for (const Flag& flag : flags_) names.push_back(flag.name);
  for (const Prefix& prefix : prefixes_) {
    for (const auto& [field, value] : prefix.fields()) names.push_back(prefix.prefix + field);
  }
  return names;
}

void FlagSet::set(const std::string& name, const std::string& value, const std::string& origin) {
  try {
    if (const Flag* flag = find(name)) return flag->set(value);
    for (const Prefix& prefix : prefixes_) {
      if (name.rfind(prefix.prefix, 0) != 0) continue;
      const std::string field = name.substr(prefix.prefix.size());
      for (const auto& [known, current] : prefix.fields()) {
        if (known == field) return prefix.set(field, value);
      }
    }
  } catch (const InputError& e) {
    throw_input_error("{}: {}", origin, e.what());
  }
  std::vector<std::string> names = known_names();
  throw_input_error("{}: {}", origin, unknown_name_message("setting", name, names));
}

namespace {

// A TOML value as the text a flag would carry.
std::string toml_text(const toml::node& node, const std::string& where) {
  if (const auto* s = node.as_string()) return s->get();
  if (const auto* i = node.as_integer()) return std::to_string(i->get());
  if (const auto* f = node.as_floating_point()) return fmt::format("{}", f->get());
  if (const auto* b = node.as_boolean()) return b->get() ? "true" : "false";
  if (const auto* a = node.as_array()) {
    std::vector<std::string> items;
    for (const toml::node& item : *a) items.push_back(toml_text(item, where));
    return fmt::format("{}", fmt::join(items, ","));
  }
  throw_input_error("{}: a table or date is not a setting value", where);
}

struct Setting {
  std::string name, value, where;  // where: "file:line"
};

void flatten(const toml::table& table, const std::string& prefix, std::vector<Setting>& out, const std::string& path) {
  for (const auto& [key, node] : table) {
    const std::string name = prefix + std::string(key.str());
    if (const auto* sub = node.as_table()) {
      flatten(*sub, name + ".", out, path);
    } else {
      const std::string where = fmt::format("{}:{}", path, node.source().begin.line);
      out.push_back({name, toml_text(node, where), where});
    }
  }
}

}  // namespace

void FlagSet::load_toml(const std::string& path) {
  toml::table table;
  try {
    table = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    const auto& where = e.source().begin;
    if (where.line == 0) throw_input_error("{}: cannot read: {}", path, e.description());
    throw_input_error("{}:{}: {}", path, where.line, e.description());
  }
  std::vector<Setting> settings;
  flatten(table, "", settings, path);
  for (const Setting& s : settings) {
    if (s.name == "config") throw_input_error("{}: 'config' cannot name another file from inside one", s.where);
    set(s.name, s.value, s.where);
  }
}

bool FlagSet::parse(int argc, const char* const* argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  // The file first, so that flags override it wherever they sit.
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--help" || args[i] == "-h") return true;
    if (args[i] == "--config" || args[i].rfind("--config=", 0) == 0) {
      std::string path = args[i] == "--config" ? (i + 1 < args.size() ? args[i + 1] : "") : args[i].substr(9);
      if (path.empty()) throw InputError("--config: expected a TOML file");
      load_toml(path);
      args.erase(args.begin() + i, args.begin() + i + (args[i] == "--config" ? 2 : 1));
      --i;
    }
  }
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) != 0) throw_input_error("unexpected argument '{}' (settings are --name=value)", arg);
    const size_t equals = arg.find('=');
    const std::string name = arg.substr(2, equals == std::string::npos ? std::string::npos : equals - 2);
    std::string value;
    if (equals != std::string::npos) {
      value = arg.substr(equals + 1);
    } else if (const Flag* flag = find(name); flag != nullptr && flag->is_bool &&
                                               (i + 1 == args.size() || args[i + 1].rfind("--", 0) == 0)) {
      value = "true";
    } else if (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) {
      value = args[++i];
    } else {
      throw_input_error("--{}: missing value", name);
    }
    set(name, value, "--" + name);
  }
  return false;
}

std::vector<std::pair<std::string, std::string>> FlagSet::values() const {
  std::vector<std::pair<std::string, std::string>> result;
  for (const Flag& flag : flags_) result.emplace_back(flag.name, flag.get());
  return result;
}

std::string FlagSet::help() const {
  std::ostringstream out;
  size_t width = 0;
  for (const Flag& flag : flags_) width = std::max(width, flag.name.size());
  for (const Flag& flag : flags_) {
    out << "  --" << flag.name << std::string(width - flag.name.size() + 2, ' ') << flag.help << " [" << flag.get()
        << "]\n";
  }
  for (const Prefix& prefix : prefixes_) {
    out << "\n" << prefix.help << "\n";
    for (const auto& [field, value] : prefix.fields()) out << "  --" << prefix.prefix << field << " [" << value << "]\n";
  }
  return out.str();
}

}  // namespace bpt::io
