#include "csrc/data/text_processor.h"

#include <nlohmann/json.hpp>

#include "csrc/common/error.h"
#include "csrc/common/text.h"

namespace bpt::data {

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
  const auto append = [&doc](int64_t token, bool loss) {
    doc.tokens.push_back(token);
    doc.loss_mask.push_back(loss ? 1 : 0);
  };
  if (add_bos_ && tokenizer_.bos_id() >= 0) append(tokenizer_.bos_id(), false);
  for (const Field& field : fields_) {
    if (field.special >= 0) {
      append(field.special, field.loss);
      continue;
    }
    std::string text;
    for (const std::string& name : field.names) {
      const auto it = document.find(name);
      if (it == document.end()) throw_input_error("{}: no field '{}' (text_processor.fields)", where, name);
      if (!it->is_string()) throw_input_error("{}: field '{}' is {}, expected a string", where, name, it->type_name());
      if (!text.empty()) text += ' ';
      text += it->get<std::string>();
    }
    for (const int64_t token : tokenizer_.encode(text, /*add_bos=*/false)) append(token, field.loss);
  }
  if (add_eos_ && tokenizer_.eos_id() >= 0) append(tokenizer_.eos_id(), true);
  return doc;
}

}  // namespace bpt::data
