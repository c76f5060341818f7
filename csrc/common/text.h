#pragma once
// Small text helpers shared by the config and flag parsers: strict number and boolean parsing
// whose errors name the field, and "did you mean" suggestions for unknown names.
#include <cstdint>
#include <string>
#include <vector>

namespace bpt {

// Each throws InputError("<field>: expected <kind>, got '<text>'").
int64_t parse_int(const std::string& text, const std::string& field);
double parse_double(const std::string& text, const std::string& field);
bool parse_bool(const std::string& text, const std::string& field);  // true/false/1/0/yes/no

// A byte count: "1234", "500MB", "5GB" (powers of 1000), "2GiB", "512KiB" (powers of 1024).
int64_t parse_bytes(const std::string& text, const std::string& field);

// The candidate closest to `name` by case-blind edit distance, or "" if none is close (about a
// third of the name differs).
std::string nearest_name(const std::string& name, const std::vector<std::string>& candidates);

// "unknown <what> 'x'" plus "; did you mean 'y'?" when a near name exists.
std::string unknown_name_message(const std::string& what, const std::string& name,
                                 const std::vector<std::string>& candidates);

// Splits "a,b,c" on `separator`, trimming spaces; empty input gives no items.
std::vector<std::string> split(const std::string& text, char separator);

}  // namespace bpt
