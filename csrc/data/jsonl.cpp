#include "csrc/data/jsonl.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "csrc/common/error.h"

namespace bpt::data {

JsonlCorpus::JsonlCorpus(std::vector<std::string> paths) : paths_(std::move(paths)) {
  if (paths_.empty()) throw InputError("json_dataset.path: no file given");
  for (size_t f = 0; f < paths_.size(); ++f) {
    std::ifstream stream(paths_[f], std::ios::binary);
    if (!stream) throw_input_error("{}: cannot open the dataset file", paths_[f]);
    int64_t offset = 0, number = 0;
    const size_t before = lines_.size();
    for (std::string line; std::getline(stream, line);) {
      ++number;
      const int64_t length = static_cast<int64_t>(line.size());
      if (line.find_first_not_of(" \t\r") != std::string::npos) {
        lines_.push_back({static_cast<int32_t>(f), number, offset, length});
      }
      offset += length + 1;
    }
    if (lines_.size() == before) throw_input_error("{}: no JSON lines in the file", paths_[f]);
  }
}

std::string JsonlCorpus::where(int64_t index) const {
  const Line& line = lines_.at(static_cast<size_t>(index));
  return paths_[line.file] + ":" + std::to_string(line.number);
}

nlohmann::json JsonlCorpus::document(int64_t index) const {
  const Line& line = lines_.at(static_cast<size_t>(index));
  std::ifstream stream(paths_[line.file], std::ios::binary);
  if (!stream) throw_input_error("{}: cannot open the dataset file", paths_[line.file]);
  std::string text(static_cast<size_t>(line.length), '\0');
  stream.seekg(line.offset);
  stream.read(text.data(), line.length);
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw_input_error("{}: not valid JSON: {}", where(index), e.what());
  }
  if (!json.is_object()) throw_input_error("{}: expected a JSON object, got {}", where(index), json.type_name());
  return json;
}

}  // namespace bpt::data
