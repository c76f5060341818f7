#include "csrc/common/text.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>

#include "csrc/common/error.h"

namespace bpt {

int64_t parse_int(const std::string& text, const std::string& field) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) throw_input_error("{}: expected an integer, got '{}'", field, text);
  return value;
}

double parse_double(const std::string& text, const std::string& field) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno == ERANGE) throw_input_error("{}: expected a number, got '{}'", field, text);
  return value;
}

bool parse_bool(const std::string& text, const std::string& field) {
  std::string lower = text;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "true" || lower == "1" || lower == "yes") return true;
  if (lower == "false" || lower == "0" || lower == "no") return false;
  throw_input_error("{}: expected true or false, got '{}'", field, text);
}

int64_t parse_bytes(const std::string& text, const std::string& field) {
  static const std::pair<const char*, double> units[] = {
      {"KiB", 1024.0}, {"MiB", 1024.0 * 1024}, {"GiB", 1024.0 * 1024 * 1024}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9},
      {"B", 1.0}};
  for (const auto& [unit, scale] : units) {
    const std::string suffix = unit;
    if (text.size() > suffix.size() && text.ends_with(suffix)) {
      const double value = parse_double(text.substr(0, text.size() - suffix.size()), field);
      if (!(value > 0)) throw_input_error("{}: expected a positive size, got '{}'", field, text);
      return static_cast<int64_t>(value * scale);
    }
  }
  const int64_t value = parse_int(text, field);
  if (value <= 0) throw_input_error("{}: expected a positive size, got '{}'", field, text);
  return value;
}

namespace {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitute = diagonal + (a[i - 1] != b[j - 1]);
      diagonal = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, substitute});
    }
  }
  return row[b.size()];
}

}  // namespace

std::string nearest_name(const std::string& name, const std::vector<std::string>& candidates) {
  const auto lower = [](std::string text) {
    std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
    return text;
  };
  std::string best;
  size_t best_distance = std::max<size_t>(2, name.size() / 3 + 1);  // closer than this, or no suggestion
  for (const std::string& candidate : candidates) {
    const size_t distance = edit_distance(lower(name), lower(candidate));
    if (distance < best_distance) {
      best = candidate;
      best_distance = distance;
    }
  }
  return best;
}

std::string unknown_name_message(const std::string& what, const std::string& name,
                                 const std::vector<std::string>& candidates) {
  std::string message = "unknown " + what + " '" + name + "'";
  const std::string near = nearest_name(name, candidates);
  if (!near.empty()) message += "; did you mean '" + near + "'?";
  return message;
}

std::vector<std::string> split(const std::string& text, char separator) {
  const auto trim = [](const std::string& item) {
    const size_t first = item.find_first_not_of(" \t");
    return first == std::string::npos ? std::string() : item.substr(first, item.find_last_not_of(" \t") - first + 1);
  };
  std::vector<std::string> items;
  if (trim(text).empty()) return items;
  size_t start = 0;
  for (size_t stop; (stop = text.find(separator, start)) != std::string::npos; start = stop + 1) {
    items.push_back(trim(text.substr(start, stop - start)));
  }
  items.push_back(trim(text.substr(start)));
  return items;
}

}  // namespace bpt
