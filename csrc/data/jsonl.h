#pragma once
// JSON-lines corpora: one or more files, one JSON object per line, indexed once by line start
// so any document can be read on demand (shuffled order, exact resume) without holding the
// text in memory.
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace bpt::data {

class JsonlCorpus {
 public:
  // Indexes every non-empty line of `paths`; InputError if a file is missing or holds none.
  explicit JsonlCorpus(std::vector<std::string> paths);

  int64_t size() const { return static_cast<int64_t>(lines_.size()); }
  // Document `index` parsed; InputError "file:line: ..." if the line is not a JSON object.
  nlohmann::json document(int64_t index) const;
  // "file:line" of document `index`, for messages.
  std::string where(int64_t index) const;

 private:
  struct Line {
    int32_t file;
    int64_t number;  // 1-based
    int64_t offset, length;
  };
  std::vector<std::string> paths_;
  std::vector<Line> lines_;
};

}  // namespace bpt::data
