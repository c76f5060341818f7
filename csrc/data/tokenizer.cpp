#include "csrc/data/tokenizer.h"

#include <sentencepiece_processor.h>

#include "csrc/common/error.h"

namespace bpt::data {

Tokenizer::Tokenizer(const std::string& model_path)
    : path_(model_path), processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  const auto status = processor_->Load(model_path);
  if (!status.ok()) throw_input_error("{}: cannot load a SentencePiece model: {}", model_path, status.ToString());
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_bos, bool add_eos) const {
  std::vector<int> pieces;
  const auto status = processor_->Encode(text, &pieces);
  if (!status.ok()) throw_input_error("{}: cannot encode text: {}", path_, status.ToString());
  std::vector<int64_t> ids;
  ids.reserve(pieces.size() + 2);
  if (add_bos && bos_id() >= 0) ids.push_back(bos_id());
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  if (add_eos && eos_id() >= 0) ids.push_back(eos_id());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> pieces;
  pieces.reserve(ids.size());
  for (const int64_t id : ids) {
    if (id < 0 || id >= vocab_size()) throw_input_error("{}: token id {} outside [0, {})", path_, id, vocab_size());
    pieces.push_back(static_cast<int>(id));
  }
  std::string text;
  const auto status = processor_->Decode(pieces, &text);
  if (!status.ok()) throw_input_error("{}: cannot decode: {}", path_, status.ToString());
  return text;
}

int64_t Tokenizer::vocab_size() const { return processor_->GetPieceSize(); }

void Tokenizer::check_fits(int64_t model_vocab_size) const {
  if (vocab_size() > model_vocab_size) {
    throw_input_error("{}: the tokenizer has {} pieces but the model's vocab_size is {} (another model's tokenizer?)",
                      path_, vocab_size(), model_vocab_size);
  }
}
int64_t Tokenizer::bos_id() const { return processor_->bos_id(); }
int64_t Tokenizer::eos_id() const { return processor_->eos_id(); }

}  // namespace bpt::data
