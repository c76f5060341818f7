#pragma once
// A SentencePiece tokenizer (LLaMA's tokenizer.model).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace bpt::data {

class Tokenizer {
 public:
  // Loads `model_path`; InputError if it is missing or not a SentencePiece model.
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;

  std::vector<int64_t> encode(const std::string& text, bool add_bos = true, bool add_eos = false) const;
  std::string decode(const std::vector<int64_t>& ids) const;

  const std::string& path() const { return path_; }
  int64_t vocab_size() const;
  int64_t bos_id() const;  // -1 when the model defines none
  int64_t eos_id() const;

  // InputError naming the file if the tokenizer has more pieces than a model's vocabulary
  // (fewer is fine: a padded vocabulary).
  void check_fits(int64_t model_vocab_size) const;

 private:
  std::string path_;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
};

}  // namespace bpt::data
