#pragma once
// What every bpt-* main shares: flag parsing with CLI11 (llamabpt's --name=value style), the
// --llama.<field>=value overrides, and the exit codes: 0 done, 2 bad input (the message
// names the file, line or flag), 1 anything else (a bug: please report it).
#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "csrc/common/error.h"
#include "csrc/common/text.h"
#include "csrc/dist/process_group.h"
#include "models/llama/config.h"

namespace bpt::app {

// Runs `body` (which parses and does the work), mapping exceptions to messages and exit codes.
inline int run(const char* name, const std::function<int()>& body) {
  try {
    return body();
  } catch (const InputError& e) {
    std::fprintf(stderr, "%s: error: %s\n", name, e.what());
    return 2;
  } catch (const std::filesystem::filesystem_error& e) {
    std::fprintf(stderr, "%s: error: %s: %s\n", name, e.path1().c_str(), e.code().message().c_str());
    return 2;
  } catch (const dist::CollectiveError& e) {
    std::fprintf(stderr, "%s: error: %s\n", name, e.what());
    return 1;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", name, e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: internal error: %s\n", name, e.what());
    return 1;
  }
}

// Parses argv; returns the exit code to stop with (help: 0, a bad flag: 2), or -1 to go on.
// Arguments CLI11 does not know are left in app.remaining() (the app allows extras).
inline int parse(CLI::App& app, int argc, char** argv) {
  app.allow_extras();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s: error: %s (see --help)\n", app.get_name().c_str(), e.what());
    return 2;
  }
  return -1;
}

// "--name" for every long option of `app`.
inline std::vector<std::string> known_flags(const CLI::App& app) {
  std::vector<std::string> known;
  for (const CLI::Option* option : app.get_options()) {
    for (const std::string& long_name : option->get_lnames()) known.push_back("--" + long_name);
  }
  return known;
}

// Applies "--llama.<field>=value" (or "--llama.<field> value") arguments to `config`; any
// other leftover argument is an unknown flag, reported with the nearest known one.
inline void apply_llama_overrides(const CLI::App& app, const std::vector<std::string>& extras,
                                  models::llama::LlamaConfig& config) {
  std::vector<std::string> known = known_flags(app);
  for (const auto& [field, value] : config.fields()) known.push_back("--llama." + field);

  for (size_t i = 0; i < extras.size(); ++i) {
    const std::string& arg = extras[i];
    const size_t equals = arg.find('=');
    const std::string flag = arg.substr(0, equals);
    if (flag.rfind("--llama.", 0) != 0 || std::find(known.begin(), known.end(), flag) == known.end()) {
      throw InputError(unknown_name_message("flag", flag, known));
    }
    std::string value;
    if (equals != std::string::npos) {
      value = arg.substr(equals + 1);
    } else if (i + 1 < extras.size()) {
      value = extras[++i];
    } else {
      throw_input_error("{}: missing value", flag);
    }
    try {
      config.set(flag.substr(8), value);
    } catch (const InputError& e) {
      throw_input_error("--llama.{}", e.what());
    }
  }
}

// What the programs pass to io::load_llama_model to adjust a checkpoint's config: the
// command line's --llama.<field> overrides, and --dtype when it is given.
inline std::function<void(models::llama::LlamaConfig&)> command_line_config(const CLI::App& app,
                                                                            const std::string& dtype) {
  return [&app, dtype](models::llama::LlamaConfig& config) {
    apply_llama_overrides(app, app.remaining(), config);
    if (!dtype.empty()) config.dtype = models::llama::parse_dtype(dtype, "--dtype");
  };
}

// Any leftover argument is an unknown flag, reported with the nearest known one.
inline void reject_extras(const CLI::App& app, const std::vector<std::string>& extras) {
  if (extras.empty()) return;
  throw InputError(unknown_name_message("flag", extras.front().substr(0, extras.front().find('=')), known_flags(app)));
}

// "--llama.<field>  <current value>" lines for --help.
inline std::string llama_fields_help(const models::llama::LlamaConfig& config) {
  std::string text =
      "LLaMA config overrides, --llama.<field>=value (in brackets: bpt's defaults; the checkpoint's config.json\n"
      "replaces them, and these flags replace that):\n";
  for (const auto& [field, value] : config.fields()) text += "  --llama." + field + " [" + value + "]\n";
  return text;
}

}  // namespace bpt::app
