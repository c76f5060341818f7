#pragma once
// Turns a JSON document into tokens and a loss mask, as llamabpt's (EasyLM's) TextProcessor:
// `fields` is a comma-separated list; "a+b" joins fields a and b with a space; a field in
// brackets, "[prompt]", is in the input but carries no loss; "<|bos|>" and "<|eos|>" insert
// those tokens. BOS starts the document (no loss) and EOS ends it (with loss), unless it ends
// with one already.
//
// A field holding a chat, a list of {"role": "system" | "user" | "assistant", "content": str}
// (an optional system message first, then user and assistant turns alternating), is laid out
// in LLaMA-2's chat template; only the assistant's words and the EOS after each answer carry
// loss:
//
//   [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} EOS BOS [INST] {user} [/INST] ...
//
// A chat may end with a user message only when a later field answers it ("[messages],response").
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "csrc/data/tokenizer.h"

namespace bpt::data {

struct TokenizedDocument {
  std::vector<int64_t> tokens;
  std::vector<uint8_t> loss_mask;  // per token: 1 if predicting this token counts in the loss
};

class TextProcessor {
 public:
  // InputError naming train_dataset.text_processor.fields if the spec is empty or malformed.
  TextProcessor(const Tokenizer& tokenizer, const std::string& fields, bool add_bos = true, bool add_eos = true);

  // `where` ("file:line") names the document in errors (a missing or non-string field).
  TokenizedDocument operator()(const nlohmann::json& document, const std::string& where) const;

 private:
  struct Field {
    std::vector<std::string> names;  // joined with ' '
    bool loss = true;
    int64_t special = -1;  // BOS/EOS id for <|bos|>, <|eos|>
  };
  // Appends `chat` (a field's list of messages) to `doc`; false if it ends with a question.
  bool append_chat(const nlohmann::json& chat, bool loss, const std::string& where, TokenizedDocument& doc) const;

  const Tokenizer& tokenizer_;
  std::vector<Field> fields_;
  bool add_bos_, add_eos_;
};

}  // namespace bpt::data
