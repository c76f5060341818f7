// bpt-eval: evaluate a LLaMA checkpoint on a local JSONL file (docs/eval.md): perplexity,
// zero-shot multiple choice (BoolQ-style yes/no included) or last-word accuracy (Lambada).
// Prints a table of the metrics; --output also writes them as JSON.
//
//   bpt-eval --model ckpt/tiny --task perplexity --data valid.jsonl --max_seq_len 1024
//   bpt-eval --model hf/llama --task multiple_choice --data boolq.jsonl --output boolq.json --details

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "apps/app.h"
#include "csrc/data/tokenizer.h"
#include "csrc/eval/eval.h"
#include "csrc/io/atomic_file.h"
#include "csrc/io/lora_adapter.h"

namespace {

using bpt::models::llama::LlamaConfig;
using bpt::models::llama::LlamaForCausalLM;

// "metric  value" lines, integers as they are, fractions to 4 decimals.
void print_table(const std::string& task, const std::string& data, const nlohmann::ordered_json& metrics) {
  std::printf("%s on %s\n", task.c_str(), data.c_str());
  size_t width = 6;  // "metric"
  for (const auto& [name, value] : metrics.items()) width = std::max(width, name.size());
  std::printf("  %-*s  %s\n", static_cast<int>(width), "metric", "value");
  for (const auto& [name, value] : metrics.items()) {
    const std::string text = value.is_number_integer() ? value.dump() : fmt::format("{:.4f}", value.get<double>());
    std::printf("  %-*s  %s\n", static_cast<int>(width), name.c_str(), text.c_str());
  }
}

int evaluate(int argc, char** argv) {
  CLI::App app{"Evaluate a LLaMA checkpoint: perplexity, multiple choice or last-word accuracy", "bpt-eval"};
  std::string model_dir, task, data_path, tokenizer_path, field = "text", dtype, output;
  int64_t max_examples = 0, max_seq_len = 0;
  bpt::eval::Options options;
  app.add_option("--model", model_dir, "Checkpoint directory (Hugging Face or bpt layout, or a LoRA adapter)")
      ->required();
  app.add_option("--task", task, "perplexity, multiple_choice or last_word")
      ->required()
      ->check(CLI::IsMember({"perplexity", "multiple_choice", "last_word"}));
  app.add_option("--data", data_path, "JSONL file of records (formats: docs/eval.md)")->required();
  app.add_option("--tokenizer", tokenizer_path, "SentencePiece model (default: <model>/tokenizer.model, or an adapter's base's)");
  app.add_option("--field", field, "perplexity: the field holding the text")->capture_default_str();
  app.add_option("--max_examples", max_examples, "Evaluate the first N records (0: all)")->capture_default_str();
  app.add_option("--max_seq_len", max_seq_len,
                 "perplexity: tokens per window; longer texts are scored in windows overlapping by one token "
                 "(0: the checkpoint's max_position_embeddings)")
      ->capture_default_str();
  app.add_option("--add_bos", options.add_bos, "Start each sequence with the tokenizer's BOS token")
      ->capture_default_str();
  app.add_option("--dtype", dtype, "Compute dtype: float32, bfloat16 or float16 (default: the checkpoint's)");
  CLI::Option* output_option = app.add_option("--output", output, "Also write the results as JSON to this file");
  app.add_flag("--details", options.details,
               "Include per-example entries (token ids, log-likelihoods, correct) in --output")
      ->needs(output_option);
  app.footer(bpt::app::llama_fields_help(LlamaConfig{}));
  if (const int code = bpt::app::parse(app, argc, argv); code >= 0) return code;

  // A malformed line or a missing output directory stops the run before the model loads.
  if (!output.empty()) {
    const std::filesystem::path parent = std::filesystem::path(output).parent_path();
    if (!parent.empty() && !std::filesystem::is_directory(parent)) {
      bpt::throw_input_error("--output: no directory {}", parent.string());
    }
  }
  const std::vector<bpt::eval::Record> records = bpt::eval::read_records(data_path, max_examples);
  LlamaForCausalLM model = bpt::io::load_llama_model(model_dir, bpt::app::command_line_config(app, dtype));
  if (tokenizer_path.empty()) tokenizer_path = bpt::io::default_tokenizer(model_dir);
  const bpt::data::Tokenizer tokenizer(tokenizer_path);
  tokenizer.check_fits(model->config.vocab_size);
  options.max_seq_len = max_seq_len != 0 ? max_seq_len : model->config.max_sequence_length;

  nlohmann::ordered_json metrics, examples;
  if (task == "perplexity") {
    const auto result = bpt::eval::perplexity(*model, tokenizer, records, field, options);
    metrics = bpt::eval::metrics_json(result);
    examples = bpt::eval::details_json(result);
  } else if (task == "multiple_choice") {
    const auto result = bpt::eval::multiple_choice(*model, tokenizer, records, options);
    metrics = bpt::eval::metrics_json(result);
    examples = bpt::eval::details_json(result);
  } else {
    const auto result = bpt::eval::last_word(*model, tokenizer, records, options);
    metrics = bpt::eval::metrics_json(result);
    examples = bpt::eval::details_json(result);
  }

  print_table(task, data_path, metrics);
  if (!output.empty()) {
    nlohmann::ordered_json report = {{"task", task}, {"model", model_dir}, {"data", data_path}, {"metrics", metrics}};
    if (options.details) report["examples"] = examples;
    bpt::io::write_file_atomically(output, report.dump() + "\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bpt::app::run("bpt-eval", [&] { return evaluate(argc, argv); });
}
