#include "csrc/eval/eval.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "csrc/common/error.h"
#include "csrc/data/jsonl.h"
#include "csrc/data/tokenizer.h"
#include "models/llama/llama.h"

namespace bpt::eval {
namespace {

using models::llama::LlamaForCausalLMImpl;

[[noreturn]] void field_error(const Record& record, const std::string& field, const std::string& what) {
  throw_input_error("{}: field '{}': {}", record.where, field, what);
}

const nlohmann::json& field_value(const Record& record, const std::string& field) {
  const auto it = record.json.find(field);
  if (it == record.json.end()) field_error(record, field, "missing");
  return *it;
}

// A non-empty string, checked.
const std::string& check_text(const Record& record, const std::string& field, const nlohmann::json& value) {
  if (!value.is_string()) field_error(record, field, fmt::format("expected a string, got {}", value.type_name()));
  const std::string& text = value.get_ref<const std::string&>();
  if (text.empty()) field_error(record, field, "empty string");
  return text;
}

const std::string& text_field(const Record& record, const std::string& field) {
  return check_text(record, field, field_value(record, field));
}

// encode(text) (BOS first when add_bos), which must leave something to condition on.
std::vector<int64_t> context_ids(const data::Tokenizer& tokenizer, const Record& record, const std::string& field,
                                 const std::string& text, bool add_bos) {
  std::vector<int64_t> ids = tokenizer.encode(text, add_bos);
  if (ids.empty()) field_error(record, field, "no tokens to condition on (whitespace only, and no --add_bos)");
  return ids;
}

// The tokens `continuation` adds after `context` (no BOS in either): encode(context +
// continuation) past encode(context) when that is its prefix, else encode(continuation) alone
// (SentencePiece merged a piece across the boundary, so no prefix of the joint encoding is
// the context's).
std::vector<int64_t> continuation_ids(const data::Tokenizer& tokenizer, const Record& record, const std::string& field,
                                      const std::string& context, const std::string& continuation) {
  const std::vector<int64_t> context_ids = tokenizer.encode(context, false);
  const std::vector<int64_t> joined = tokenizer.encode(context + continuation, false);
  std::vector<int64_t> ids;
  if (joined.size() > context_ids.size() && std::equal(context_ids.begin(), context_ids.end(), joined.begin())) {
    ids.assign(joined.begin() + static_cast<std::ptrdiff_t>(context_ids.size()), joined.end());
  } else {
    ids = tokenizer.encode(continuation, false);
  }
  if (ids.empty()) field_error(record, field, "no tokens (whitespace only?)");
  return ids;
}

struct TokenScores {
  std::vector<double> logprobs;  // of ids[first..], each given the ids before it
  std::vector<int64_t> argmax;   // the model's most likely token at each of those positions
};

// One forward pass over `ids`, scoring ids[first..] (first >= 1).
TokenScores score_tokens(LlamaForCausalLMImpl& model, const std::vector<int64_t>& ids, size_t first) {
  const auto length = static_cast<int64_t>(ids.size());
  const auto begin = static_cast<int64_t>(first);
  const at::Tensor input = at::tensor(ids, at::kLong).unsqueeze(0).to(model.lm_head->weight.device());
  // logits[t] predicts ids[t + 1]; only the rows that predict a scored token are kept.
  const at::Tensor logits = model.logits(input)[0].slice(0, begin - 1, length - 1).to(at::kFloat);
  const at::Tensor targets = input[0].slice(0, begin, length).unsqueeze(1);
  const at::Tensor logprobs = logits.log_softmax(-1).gather(1, targets).squeeze(1).to(at::kDouble).cpu();
  const at::Tensor argmax = logits.argmax(-1).cpu();
  const double* logprob = logprobs.data_ptr<double>();
  const int64_t* best = argmax.data_ptr<int64_t>();
  return {{logprob, logprob + logprobs.numel()}, {best, best + argmax.numel()}};
}

double sum(const std::vector<double>& values) {
  double total = 0;
  for (const double value : values) total += value;
  return total;
}

// The index of the largest value; ties go to the lowest index.
int64_t first_argmax(const std::vector<double>& values) {
  size_t best = 0;
  for (size_t i = 1; i < values.size(); ++i) {
    if (values[i] > values[best]) best = i;
  }
  return static_cast<int64_t>(best);
}

// A multiple-choice record as text, before tokenizing.
struct ChoiceQuestion {
  std::string prompt, prompt_field;
  std::vector<std::string> choices;
  int64_t label = 0;
};

// BoolQ {"passage", "question", "answer"} as lm-evaluation-harness poses it.
ChoiceQuestion boolq_question(const Record& record) {
  const std::string& passage = text_field(record, "passage");
  const std::string& question = text_field(record, "question");
  const nlohmann::json& answer = field_value(record, "answer");
  if (!answer.is_boolean()) field_error(record, "answer", fmt::format("expected true or false, got {}", answer.dump()));
  return {.prompt = passage + "\nQuestion: " + question + "?\nAnswer:",
          .prompt_field = "passage",
          .choices = {" no", " yes"},
          .label = answer.get<bool>() ? 1 : 0};
}

// {"prompt", "choices", "label"}, or BoolQ's fields.
ChoiceQuestion choice_question(const Record& record) {
  if (record.json.contains("passage")) return boolq_question(record);
  if (!record.json.contains("prompt")) {
    field_error(record, "prompt", "missing (a record is {prompt, choices, label} or BoolQ's {passage, question, answer})");
  }
  ChoiceQuestion question{.prompt = text_field(record, "prompt"), .prompt_field = "prompt"};
  const nlohmann::json& choices = field_value(record, "choices");
  if (!choices.is_array()) {
    field_error(record, "choices", fmt::format("expected an array of strings, got {}", choices.type_name()));
  }
  if (choices.size() < 2) field_error(record, "choices", fmt::format("expected 2 or more, got {}", choices.size()));
  for (size_t i = 0; i < choices.size(); ++i) {
    question.choices.push_back(check_text(record, fmt::format("choices[{}]", i), choices[i]));
  }
  const nlohmann::json& label = field_value(record, "label");
  if (!label.is_number_integer()) field_error(record, "label", fmt::format("expected an integer, got {}", label.dump()));
  question.label = label.get<int64_t>();
  if (question.label < 0 || question.label >= static_cast<int64_t>(choices.size())) {
    field_error(record, "label", fmt::format("{} is not a choice index (0 to {})", question.label, choices.size() - 1));
  }
  return question;
}

}  // namespace

std::vector<Record> read_records(const std::string& path, int64_t max_examples) {
  if (max_examples < 0) throw_input_error("--max_examples: expected >= 0 (0: all), got {}", max_examples);
  const data::JsonlCorpus corpus({path});
  const int64_t count = max_examples > 0 ? std::min(max_examples, corpus.size()) : corpus.size();
  std::vector<Record> records;
  records.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) records.push_back({corpus.document(i), corpus.where(i)});
  return records;
}

PerplexityResult perplexity(LlamaForCausalLMImpl& model, const data::Tokenizer& tokenizer,
                            const std::vector<Record>& records, const std::string& field, const Options& options) {
  if (options.max_seq_len < 2) throw_input_error("--max_seq_len: expected >= 2, got {}", options.max_seq_len);
  PerplexityResult result;
  for (const Record& record : records) {
    std::vector<int64_t> ids = tokenizer.encode(text_field(record, field), options.add_bos);
    if (ids.size() < 2) {
      field_error(record, field, fmt::format("{} token, nothing to score (the first token is only context)", ids.size()));
    }
    result.details.push_back({.where = record.where, .ids = std::move(ids)});
  }

  at::NoGradGuard no_grad;
  const auto window = static_cast<size_t>(options.max_seq_len);
  double nll_sum = 0;
  for (PerplexityExample& example : result.details) {
    const std::vector<int64_t>& ids = example.ids;
    // Windows of max_seq_len tokens overlapping by one: each window after the first starts
    // with the last token of the window before, as context only, so every token after the
    // first is scored exactly once.
    for (size_t start = 0; start + 1 < ids.size(); start += window - 1) {
      const size_t end = std::min(start + window, ids.size());
      example.nll_sum -= sum(score_tokens(model, {ids.begin() + start, ids.begin() + end}, 1).logprobs);
    }
    nll_sum += example.nll_sum;
    result.tokens += static_cast<int64_t>(ids.size()) - 1;
  }
  result.examples = static_cast<int64_t>(records.size());
  result.nll = nll_sum / static_cast<double>(result.tokens);
  result.perplexity = std::exp(result.nll);
  if (!options.details) result.details.clear();
  return result;
}

MultipleChoiceResult multiple_choice(LlamaForCausalLMImpl& model, const data::Tokenizer& tokenizer,
                                     const std::vector<Record>& records, const Options& options) {
  MultipleChoiceResult result;
  for (const Record& record : records) {
    const ChoiceQuestion question = choice_question(record);
    MultipleChoiceExample example{
        .where = record.where,
        .context_ids = context_ids(tokenizer, record, question.prompt_field, question.prompt, options.add_bos),
        .label = question.label};
    for (size_t i = 0; i < question.choices.size(); ++i) {
      const std::string& text = question.choices[i];
      example.choices.push_back(
          {.text = text,
           .ids = continuation_ids(tokenizer, record, fmt::format("choices[{}]", i), question.prompt, text),
           .bytes = static_cast<int64_t>(text.size())});
    }
    result.details.push_back(std::move(example));
  }

  at::NoGradGuard no_grad;
  int64_t correct = 0, correct_norm = 0;
  for (MultipleChoiceExample& example : result.details) {
    std::vector<double> loglik, loglik_per_byte;
    for (ChoiceScore& choice : example.choices) {
      std::vector<int64_t> ids = example.context_ids;
      ids.insert(ids.end(), choice.ids.begin(), choice.ids.end());
      choice.loglik = sum(score_tokens(model, ids, example.context_ids.size()).logprobs);
      loglik.push_back(choice.loglik);
      loglik_per_byte.push_back(choice.loglik / static_cast<double>(choice.bytes));
    }
    example.prediction = first_argmax(loglik);
    example.prediction_norm = first_argmax(loglik_per_byte);
    correct += example.prediction == example.label;
    correct_norm += example.prediction_norm == example.label;
  }
  result.examples = static_cast<int64_t>(records.size());
  result.accuracy = static_cast<double>(correct) / static_cast<double>(result.examples);
  result.accuracy_norm = static_cast<double>(correct_norm) / static_cast<double>(result.examples);
  if (!options.details) result.details.clear();
  return result;
}

LastWordResult last_word(LlamaForCausalLMImpl& model, const data::Tokenizer& tokenizer,
                         const std::vector<Record>& records, const Options& options) {
  LastWordResult result;
  for (const Record& record : records) {
    if (record.json.contains("prompt")) {
      // A fine-tuned answer, matched exactly, tokenized as bpt-train tokenizes the fields
      // "[prompt],response": each on its own.
      std::vector<int64_t> target_ids = tokenizer.encode(text_field(record, "response"), false);
      if (target_ids.empty()) field_error(record, "response", "no tokens (whitespace only?)");
      result.details.push_back(
          {.where = record.where,
           .context_ids = context_ids(tokenizer, record, "prompt", text_field(record, "prompt"), options.add_bos),
           .target_ids = std::move(target_ids)});
      continue;
    }
    // Lambada: the last word, with its space, after the rest of the text.
    const std::string& text = text_field(record, "text");
    const size_t space = text.rfind(' ');
    if (space == std::string::npos || space == 0 || space + 1 == text.size()) {
      field_error(record, "text", "expected words separated by spaces, the last one the target "
                                  "(or give {prompt, response})");
    }
    const std::string context = text.substr(0, space);
    result.details.push_back({.where = record.where,
                              .context_ids = context_ids(tokenizer, record, "text", context, options.add_bos),
                              .target_ids = continuation_ids(tokenizer, record, "text", context, text.substr(space))});
  }

  at::NoGradGuard no_grad;
  int64_t correct = 0;
  double nll_sum = 0;
  for (LastWordExample& example : result.details) {
    std::vector<int64_t> ids = example.context_ids;
    ids.insert(ids.end(), example.target_ids.begin(), example.target_ids.end());
    TokenScores scores = score_tokens(model, ids, example.context_ids.size());
    example.loglik = sum(scores.logprobs);
    example.predicted_ids = std::move(scores.argmax);
    // Teacher forcing: every target token the argmax given the true ones before it, which is
    // exactly when greedy decoding would produce the target.
    example.correct = example.predicted_ids == example.target_ids;
    correct += example.correct;
    nll_sum -= example.loglik;
    result.target_tokens += static_cast<int64_t>(example.target_ids.size());
  }
  result.examples = static_cast<int64_t>(records.size());
  result.accuracy = static_cast<double>(correct) / static_cast<double>(result.examples);
  result.target_nll = nll_sum / static_cast<double>(result.target_tokens);
  if (!options.details) result.details.clear();
  return result;
}

nlohmann::ordered_json metrics_json(const PerplexityResult& result) {
  return {{"examples", result.examples}, {"tokens", result.tokens}, {"nll", result.nll},
          {"perplexity", result.perplexity}};
}

nlohmann::ordered_json metrics_json(const MultipleChoiceResult& result) {
  return {{"examples", result.examples}, {"accuracy", result.accuracy}, {"accuracy_norm", result.accuracy_norm}};
}

nlohmann::ordered_json metrics_json(const LastWordResult& result) {
  return {{"examples", result.examples}, {"accuracy", result.accuracy}, {"target_nll", result.target_nll},
          {"target_tokens", result.target_tokens}};
}

nlohmann::ordered_json details_json(const PerplexityResult& result) {
  nlohmann::ordered_json examples = nlohmann::ordered_json::array();
  for (const PerplexityExample& example : result.details) {
    const auto tokens = static_cast<int64_t>(example.ids.size()) - 1;
    examples.push_back({{"where", example.where}, {"ids", example.ids}, {"tokens", tokens},
                        {"nll", example.nll_sum / static_cast<double>(tokens)}});
  }
  return examples;
}

nlohmann::ordered_json details_json(const MultipleChoiceResult& result) {
  nlohmann::ordered_json examples = nlohmann::ordered_json::array();
  for (const MultipleChoiceExample& example : result.details) {
    nlohmann::ordered_json choices = nlohmann::ordered_json::array();
    for (const ChoiceScore& choice : example.choices) {
      choices.push_back({{"text", choice.text}, {"ids", choice.ids}, {"loglik", choice.loglik}, {"bytes", choice.bytes}});
    }
    examples.push_back({{"where", example.where},
                        {"context_ids", example.context_ids},
                        {"choices", std::move(choices)},
                        {"label", example.label},
                        {"prediction", example.prediction},
                        {"prediction_norm", example.prediction_norm},
                        {"correct", example.prediction == example.label},
                        {"correct_norm", example.prediction_norm == example.label}});
  }
  return examples;
}

nlohmann::ordered_json details_json(const LastWordResult& result) {
  nlohmann::ordered_json examples = nlohmann::ordered_json::array();
  for (const LastWordExample& example : result.details) {
    examples.push_back({{"where", example.where},
                        {"context_ids", example.context_ids},
                        {"target_ids", example.target_ids},
                        {"predicted_ids", example.predicted_ids},
                        {"loglik", example.loglik},
                        {"correct", example.correct}});
  }
  return examples;
}

}  // namespace bpt::eval
