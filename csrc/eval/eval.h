#pragma once
// Zero-shot evaluation of a causal LM on JSONL records (docs/eval.md):
//   perplexity       token-weighted mean negative log-likelihood of a text field;
//   multiple_choice  the choice with the highest summed log-likelihood after the prompt
//                    (BoolQ records become a " no" / " yes" choice);
//   last_word        whether the model's argmax reproduces every token of a target
//                    (Lambada's last word, or a fine-tuned response) under teacher forcing.
//
// Every record is checked before the model runs: a bad one is an InputError naming
// "file:line" and the field. The model is used as given (eval mode is the caller's job);
// the functions run under no_grad.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace bpt::data {
class Tokenizer;
}
namespace bpt::models::llama {
class LlamaForCausalLMImpl;
}

namespace bpt::eval {

struct Record {
  nlohmann::json json;  // a JSON object
  std::string where;    // "file:line", for messages
};

// The first `max_examples` (0: all) non-empty lines of the JSONL file `path`.
std::vector<Record> read_records(const std::string& path, int64_t max_examples);

struct Options {
  bool add_bos = true;         // every sequence starts with the tokenizer's BOS
  int64_t max_seq_len = 2048;  // perplexity: tokens per window (>= 2)
  bool details = false;        // keep the per-example entries
};

// ---- perplexity: each record's text field, ids = [BOS] + encode(text).
struct PerplexityExample {
  std::string where;
  std::vector<int64_t> ids;
  double nll_sum = 0;  // over ids[1..], nats
};
struct PerplexityResult {
  int64_t examples = 0;
  int64_t tokens = 0;     // scored: every token after the first, of every record
  double nll = 0;         // mean per scored token, nats
  double perplexity = 0;  // exp(nll)
  std::vector<PerplexityExample> details;
};
PerplexityResult perplexity(models::llama::LlamaForCausalLMImpl& model, const data::Tokenizer& tokenizer,
                            const std::vector<Record>& records, const std::string& field, const Options& options);

// ---- multiple_choice: {"prompt", "choices", "label"} or BoolQ's {"passage", "question", "answer"}.
struct ChoiceScore {
  std::string text;
  std::vector<int64_t> ids;  // the choice's tokens after the context
  double loglik = 0;         // summed log-probability of ids
  int64_t bytes = 0;         // UTF-8 length of text, accuracy_norm's divisor
};
struct MultipleChoiceExample {
  std::string where;
  std::vector<int64_t> context_ids;
  std::vector<ChoiceScore> choices;
  int64_t label = 0, prediction = 0, prediction_norm = 0;
};
struct MultipleChoiceResult {
  int64_t examples = 0;
  double accuracy = 0;       // argmax of loglik == label
  double accuracy_norm = 0;  // argmax of loglik / bytes == label
  std::vector<MultipleChoiceExample> details;
};
MultipleChoiceResult multiple_choice(models::llama::LlamaForCausalLMImpl& model, const data::Tokenizer& tokenizer,
                                     const std::vector<Record>& records, const Options& options);

// ---- last_word: {"text"} (the last space-separated word is the target) or {"prompt", "response"}.
struct LastWordExample {
  std::string where;
  std::vector<int64_t> context_ids, target_ids;
  std::vector<int64_t> predicted_ids;  // the argmax at each target position
  double loglik = 0;                   // summed log-probability of target_ids
  bool correct = false;                // predicted_ids == target_ids
};
struct LastWordResult {
  int64_t examples = 0;
  double accuracy = 0;
  int64_t target_tokens = 0;
  double target_nll = 0;  // mean per target token, nats
  std::vector<LastWordExample> details;
};
LastWordResult last_word(models::llama::LlamaForCausalLMImpl& model, const data::Tokenizer& tokenizer,
                         const std::vector<Record>& records, const Options& options);

// {"examples": ..., <metric>: ...}: the result's numbers, for the JSON output and the table.
nlohmann::ordered_json metrics_json(const PerplexityResult& result);
nlohmann::ordered_json metrics_json(const MultipleChoiceResult& result);
nlohmann::ordered_json metrics_json(const LastWordResult& result);
// The per-example entries (empty unless Options::details).
nlohmann::ordered_json details_json(const PerplexityResult& result);
nlohmann::ordered_json details_json(const MultipleChoiceResult& result);
nlohmann::ordered_json details_json(const LastWordResult& result);

}  // namespace bpt::eval
