#pragma once
// Named settings from a TOML file and the command line, llamabpt style:
//
//   bpt-train --config configs/llama/tiny.toml --optimizer.adamw_optimizer.lr=3e-4 --autoresume
//
// Every setting is a dotted name with a default and a help line. The TOML file's tables
// flatten to the same dotted names ([optimizer.adamw_optimizer] lr = 3e-4), and the command
// line wins over the file wherever the flag sits. A name may also be claimed by a prefix
// (--llama.<field>), handed to its own parser. An unknown name or a bad value is an InputError
// naming it, the file or flag it came from, and the nearest known name.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace bpt::io {

class FlagSet {
 public:
  using Setter = std::function<void(const std::string& value)>;
  using Getter = std::function<std::string()>;

  void add(std::string name, std::string help, Setter set, Getter get);
  void add(std::string name, std::string help, std::string* target);
  void add(std::string name, std::string help, int64_t* target);
  void add(std::string name, std::string help, double* target);
  void add(std::string name, std::string help, bool* target);  // "--name" alone means true

  // Names starting with `prefix` ("llama.") go to set(field, value); names() lists the fields.
  void add_prefix(std::string prefix, std::string help, std::function<void(const std::string&, const std::string&)> set,
                  std::function<std::vector<std::pair<std::string, std::string>>()> fields);

  // Sets `name` from text; `origin` ("--x", "tiny.toml") prefixes errors.
  void set(const std::string& name, const std::string& value, const std::string& origin);
  // Every key of a TOML file, tables flattened to dotted names; arrays become "a,b,c".
  void load_toml(const std::string& path);
  // argv: "--config FILE" first (wherever it is), then every "--name=value", "--name value"
  // or bare "--flag". Returns true if --help was asked for (the caller prints help()).
  bool parse(int argc, const char* const* argv);

  // Every setting with its current value and help, for --help.
  std::string help() const;
  // Every setting's current value by name, the prefixed ones included (for the record a
  // checkpoint keeps of the run that wrote it).
  std::vector<std::pair<std::string, std::string>> values() const;

 private:
  struct Flag {
    std::string name, help;
    Setter set;
    Getter get;
    bool is_bool = false;
  };
  struct Prefix {
    std::string prefix, help;
    std::function<void(const std::string&, const std::string&)> set;
    std::function<std::vector<std::pair<std::string, std::string>>()> fields;
  };
  const Flag* find(const std::string& name) const;
  std::vector<std::string> known_names() const;

  std::vector<Flag> flags_;
  std::vector<Prefix> prefixes_;
};

}  // namespace bpt::io
