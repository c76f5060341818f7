#pragma once
// The one exception type for bad user input (a missing or corrupt file, a malformed line, an
// unknown flag, a shape that does not match): the apps print its message alone and exit with
// code 2. Anything else that escapes is a bug in bpt and exits with code 1.
//
// Messages name the file, line or field first and say what was expected and what came:
//   "ckpt/model.safetensors: tensor 'lm_head.weight': shape [64, 32], expected [128, 32]"
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <stdexcept>
#include <string>

namespace bpt {

class InputError : public std::runtime_error {
 public:
  explicit InputError(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void throw_input_error(fmt::format_string<Args...> format, Args&&... args) {
  throw InputError(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace bpt
