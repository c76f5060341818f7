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
  if (add_bos_ && tokenizer_.bos_id() >= 0) push(doc, tokenizer_.bos_id(), false);
  for (const Field& field : fields_) {
    if (field.special >= 0) {
      push(doc, field.special, field.loss);
      continue;
    }
    if (field.names.size() == 1 && document.contains(field.names[0]) && document.at(field.names[0]).is_array()) {
      const std::string chat_where = fmt::format("{}: field '{}'", where, field.names[0]);
      const bool answered = append_chat(document.at(field.names[0]), field.loss, chat_where, doc);
      // A last question with no answer after it would train an EOS straight after [/INST].
      if (!answered && &field == &fields_.back()) {
        throw_input_error("{}: the chat ends with a user message and no later field answers it (end it with the "
                          "assistant's answer, or give the answer in a field after it: '[messages],response')",
                          chat_where);
      }
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
    for (const int64_t token : tokenizer_.encode(text, /*add_bos=*/false)) push(doc, token, field.loss);
  }
  const int64_t eos = tokenizer_.eos_id();
  if (add_eos_ && eos >= 0 && (doc.tokens.empty() || doc.tokens.back() != eos)) push(doc, eos, true);
  return doc;
}

bool TextProcessor::append_chat(const nlohmann::json& chat, bool loss, const std::string& where,
                                TokenizedDocument& doc) const {
  const auto append_text = [&](const std::string& text, bool counts) {
    for (const int64_t token : tokenizer_.encode(text, /*add_bos=*/false)) push(doc, token, counts);
  };
  // The roles allowed next, in order: an optional system message, then user and assistant turns.
  enum class Next { SystemOrUser, User, Assistant };
  Next next = Next::SystemOrUser;
  std::string system;
  bool first_turn = true;
  for (size_t i = 0; i < chat.size(); ++i) {
    const nlohmann::json& message = chat[i];
    const auto role = message.is_object() ? message.find("role") : message.end();
    const auto content = message.is_object() ? message.find("content") : message.end();
    if (!message.is_object() || role == message.end() || !role->is_string() || content == message.end() ||
        !content->is_string()) {
      throw_input_error("{}: message {}: expected {{\"role\": str, \"content\": str}}", where, i);
    }
    const std::string name = role->get<std::string>();
    const bool allowed = (name == "system" && next == Next::SystemOrUser) ||
                         (name == "user" && next != Next::Assistant) || (name == "assistant" && next == Next::Assistant);
    if (!allowed) {
      throw_input_error("{}: message {} has role '{}', expected {} (an optional system message first, then user and "
                        "assistant alternating)", where, i, name,
                        next == Next::SystemOrUser ? "system or user" : next == Next::User ? "user" : "assistant");
    }
    const std::string text = content->get<std::string>();
    if (name == "system") {
      system = text;
      next = Next::User;
    } else if (name == "user") {
      if (!first_turn && tokenizer_.bos_id() >= 0) push(doc, tokenizer_.bos_id(), false);
      const std::string header = system.empty() ? "" : "<<SYS>>\n" + system + "\n<</SYS>>\n\n";
      append_text("[INST] " + (first_turn ? header : "") + text + " [/INST]", false);
      first_turn = false;
      next = Next::Assistant;
    } else {
      append_text(text, loss);
      if (tokenizer_.eos_id() >= 0) push(doc, tokenizer_.eos_id(), loss);
      next = Next::User;
    }
  }
  if (first_turn) throw_input_error("{}: a chat needs at least one user message", where);
  return next == Next::User;
}

}  // namespace bpt::data
