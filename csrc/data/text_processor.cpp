#include "csrc/data/text_processor.h"

#include <nlohmann/json.hpp>

#include "csrc/common/error.h"
#include "csrc/common/text.h"

namespace bpt::data {
namespace {

void push(TokenizedDocument& doc, int64_t token, bool loss) {
  doc.tokens.push_back(token);
  doc.loss_mask.push_back(loss ? 1 : 0);
}

}  // namespace

TextProcessor::TextProcessor(const Tokenizer& tokenizer, const std::string& fields, bool add_bos, bool add_eos)
    : tokenizer_(tokenizer), add_bos_(add_bos), add_eos_(add_eos) {
  for (std::string spec : split(fields, ',')) {
    Field field;
    if (spec.size() >= 2 && spec.front() == '[' && spec.back() == ']') {
      field.loss = false;
      spec = spec.substr(1, spec.size() - 2);
    }
    if (spec == "<|bos|>") {
      field.special = tokenizer.bos_id();
    } else if (spec == "<|eos|>") {
      field.special = tokenizer.eos_id();
    } else {
      field.names = split(spec, '+');
      for (const std::string& name : field.names) {
        if (name.empty()) throw_input_error("text_processor.fields: empty field name in '{}'", fields);
      }
    }
    fields_.push_back(std::move(field));
  }
  if (fields_.empty()) throw InputError("text_processor.fields: no field given (e.g. 'text')");
}

TokenizedDocument TextProcessor::operator()(const nlohmann::json& document, const std::string& where) const {
  TokenizedDocument doc;
  const auto append = [&doc](int64_t token, bool loss) { push(doc, token, loss); };
  if (add_bos_ && tokenizer_.bos_id() >= 0) append(tokenizer_.bos_id(), false);
  for (const Field& field : fields_) {
    if (field.special >= 0) {
      append(field.special, field.loss);
      continue;
    }
    if (field.names.size() == 1 && document.contains(field.names[0]) && document.at(field.names[0]).is_array()) {
      append_chat(document.at(field.names[0]), field.loss, fmt::format("{}: field '{}'", where, field.names[0]), doc);
      continue;
    }
    std::string text;
    for (const std::string& name : field.names) {
      const auto it = document.find(name);
      if (it == document.end()) throw_input_error("{}: no field '{}' (text_processor.fields)", where, name);
      if (!it->is_string()) {
        throw_input_error("{}: field '{}' is {}, expected a string (or a chat: a list of messages)", where, name,
                          it->type_name());
      }
      if (!text.empty()) text += ' ';
      text += it->get<std::string>();
    }
    for (const int64_t token : tokenizer_.encode(text, /*add_bos=*/false)) append(token, field.loss);
  }
  const int64_t eos = tokenizer_.eos_id();
  if (add_eos_ && eos >= 0 && (doc.tokens.empty() || doc.tokens.back() != eos)) append(eos, true);
  return doc;
}

void TextProcessor::append_chat(const nlohmann::json& chat, bool loss, const std::string& where,
                                TokenizedDocument& doc) const {
  const auto append_text = [&](const std::string& text, bool counts) {
    for (const int64_t token : tokenizer_.encode(text, /*add_bos=*/false)) push(doc, token, counts);
  };
  const auto append_token = [&](int64_t token, bool counts) {
    if (token >= 0) push(doc, token, counts);  // a tokenizer may have no BOS or EOS
  };
  std::string system;
  bool first_turn = true;
  std::string expected = "system or user";
  for (size_t i = 0; i < chat.size(); ++i) {
    const nlohmann::json& message = chat[i];
    const auto role = message.is_object() ? message.find("role") : message.end();
    const auto content = message.is_object() ? message.find("content") : message.end();
    if (!message.is_object() || role == message.end() || !role->is_string() || content == message.end() ||
        !content->is_string()) {
      throw_input_error("{}: message {}: expected {{\"role\": str, \"content\": str}}", where, i);
    }
    const std::string name = role->get<std::string>();
    if (expected.find(name) == std::string::npos || (name == "system" && i != 0)) {
      throw_input_error("{}: message {} has role '{}', expected {} (an optional system message first, then user and "
                        "assistant alternating)", where, i, name, expected);
    }
    const std::string text = content->get<std::string>();
    if (name == "system") {
      system = text;
      expected = "user";
    } else if (name == "user") {
      if (!first_turn) append_token(tokenizer_.bos_id(), false);
      const std::string header = system.empty() ? "" : "<<SYS>>\n" + system + "\n<</SYS>>\n\n";
      append_text("[INST] " + (first_turn ? header : "") + text + " [/INST]", false);
      first_turn = false;
      expected = "assistant";
    } else {
      append_text(text, loss);
      append_token(tokenizer_.eos_id(), loss);
      expected = "user";
    }
  }
  if (first_turn) throw_input_error("{}: a chat needs at least one user message", where);
}

}  // namespace bpt::data
