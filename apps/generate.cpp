// bpt-generate: text from a LLaMA checkpoint (Hugging Face or bpt layout, or a LoRA adapter) with a KV cache,
// greedy or sampled, printed as it is produced.
//
//   bpt-generate --model ckpt/tiny --prompt "Once upon a time" --max_new_tokens 64
//   bpt-generate --model hf/llama --prompt_file prompts.txt --do_sample --temperature 0.8 --top_p 0.9

#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "apps/app.h"
#include "csrc/data/tokenizer.h"
#include "csrc/generate/generate.h"
#include "csrc/io/lora_adapter.h"

namespace {

using bpt::InputError;
using bpt::throw_input_error;

std::vector<std::string> read_prompts(const std::string& path) {
  std::ifstream stream(path);
  if (!stream) throw_input_error("{}: cannot open the prompt file", path);
  std::vector<std::string> prompts;
  for (std::string line; std::getline(stream, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();  // CRLF files
    if (!line.empty()) prompts.push_back(line);
  }
  if (prompts.empty()) throw_input_error("{}: no prompts (one per non-empty line)", path);
  return prompts;
}

// Prints the text of `ids` as it grows: the new part of the decoded string each time, so
// SentencePiece's spaces and multi-piece characters come out right.
class TextStream {
 public:
  // Starts after `prompt_ids`, so the first new piece keeps its leading space.
  TextStream(const bpt::data::Tokenizer& tokenizer, std::vector<int64_t> prompt_ids)
      : tokenizer_(tokenizer), ids_(std::move(prompt_ids)), printed_(tokenizer.decode(ids_).size()) {}
  void push(int64_t id) {
    ids_.push_back(id);
    const std::string text = tokenizer_.decode(ids_);
    if (text.size() > printed_ && !text.ends_with("\xEF\xBF\xBD")) {  // not inside a split character
      std::fwrite(text.data() + printed_, 1, text.size() - printed_, stdout);
      std::fflush(stdout);
      printed_ = text.size();
    }
  }

 private:
  const bpt::data::Tokenizer& tokenizer_;
  std::vector<int64_t> ids_;
  size_t printed_;
};

int generate(int argc, char** argv) {
  CLI::App app{"Generate text from a LLaMA checkpoint", "bpt-generate"};
  std::string model_dir, tokenizer_path, prompt_file, output = "text", dtype;
  std::vector<std::string> prompts;
  bpt::generate::GenerateOptions options;
  bool use_cache = true, add_bos = true;
  int64_t max_len = 0;
  options.sampling.top_k = 50;  // transformers' default
  app.add_option("--model", model_dir,
                 "Checkpoint directory (Hugging Face or bpt layout, or a LoRA adapter over its base)")
      ->required();
  app.add_option("--tokenizer", tokenizer_path, "SentencePiece model (default: <model>/tokenizer.model, or an adapter's base's)");
  app.add_option("--prompt", prompts, "A prompt; repeat the flag for several");
  app.add_option("--prompt_file", prompt_file, "A file of prompts, one per line");
  app.add_option("--max_new_tokens", options.max_new_tokens, "Tokens to generate per prompt")->capture_default_str();
  app.add_option("--max_len", max_len,
                 "Stop when prompt + generated tokens reach this many (bLLaMA's max_len; 0: --max_new_tokens only)")
      ->capture_default_str();
  app.add_flag("--do_sample,!--greedy", options.sampling.do_sample, "Sample (default: greedy, the argmax)");
  app.add_option("--temperature", options.sampling.temperature, "Divide logits by this before sampling")
      ->capture_default_str();
  app.add_option("--top_k", options.sampling.top_k, "Sample among the k most likely tokens (0: all; 50 as transformers)")
      ->capture_default_str();
  app.add_option("--top_p", options.sampling.top_p, "Sample from the smallest set with this much probability")
      ->capture_default_str();
  app.add_option("--repetition_penalty", options.sampling.repetition_penalty,
                 "Penalise tokens already in the text (1: none; 1.1-1.3 is typical)")
      ->capture_default_str();
  app.add_option("--seed", options.seed, "Random seed for sampling")->capture_default_str();
  app.add_option("--use_cache", use_cache, "Decode with a KV cache (false: recompute the whole text each step)")
      ->capture_default_str();
  app.add_option("--add_bos", add_bos, "Start each prompt with the tokenizer's BOS token")->capture_default_str();
  app.add_option("--dtype", dtype, "Compute dtype: float32, bfloat16 or float16 (default: the checkpoint's)");
  app.add_option("--output", output, "text: stream the text; json: one JSON line per prompt with token ids")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.footer(bpt::app::llama_fields_help(bpt::models::llama::LlamaConfig{}));
  if (const int code = bpt::app::parse(app, argc, argv); code >= 0) return code;

  if (!prompt_file.empty()) {
    for (std::string& prompt : read_prompts(prompt_file)) prompts.push_back(std::move(prompt));
  }
  if (prompts.empty()) throw InputError("no prompt: give --prompt TEXT or --prompt_file FILE");
  if (max_len < 0) bpt::throw_input_error("--max_len: expected >= 0 (0: off), got {}", max_len);
  if (tokenizer_path.empty()) tokenizer_path = bpt::io::default_tokenizer(model_dir);
  const bpt::data::Tokenizer tokenizer(tokenizer_path);
  const bpt::models::llama::LlamaForCausalLM model =
      bpt::io::load_llama_model(model_dir, bpt::app::command_line_config(app, dtype));
  tokenizer.check_fits(model->config.vocab_size);
  options.eos_ids = model->config.eos_token_ids;
  options.sampling.vocab_limit = tokenizer.vocab_size();
  if (const int64_t layers = model->unquantized_bitlinear_layers(); layers > 0) {
    std::fprintf(stderr, "bpt-generate: warning: %lld BitLinear layers are not quantized: inference runs the "
                 "fake-quantized full-precision weights (bpt-convert --quantize ternary packs them)\n",
                 static_cast<long long>(layers));
  }
  const auto decoder = bpt::generate::llama_decoder(model, use_cache);

  for (const std::string& prompt : prompts) {
    const std::vector<int64_t> prompt_ids = tokenizer.encode(prompt, add_bos);
    if (max_len > 0) {
      options.max_new_tokens = std::max<int64_t>(0, max_len - static_cast<int64_t>(prompt_ids.size()));
    }
    TextStream stream(tokenizer, prompt_ids);
    if (output == "text") std::printf("%s", prompt.c_str());
    const auto start = std::chrono::steady_clock::now();
    const std::vector<int64_t> ids = bpt::generate::generate(*decoder, prompt_ids, options, [&](int64_t id) {
      if (output == "text" && !options.is_eos(id)) stream.push(id);
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (output == "json") {
      // "text": the continuation as text mode prints it after the prompt (EOS left out).
      std::vector<int64_t> all_ids = prompt_ids;
      for (const int64_t id : ids) {
        if (!options.is_eos(id)) all_ids.push_back(id);
      }
      const std::string continuation = tokenizer.decode(all_ids).substr(tokenizer.decode(prompt_ids).size());
      const nlohmann::json line = {{"prompt", prompt},
                                   {"prompt_ids", prompt_ids},
                                   {"ids", ids},
                                   {"text", continuation},
                                   {"tokens_per_s", ids.size() / seconds}};
      std::printf("%s\n", line.dump().c_str());
    } else {
      std::printf("\n");
      std::fflush(stdout);  // the text line ends before the stats line on a shared terminal
      std::fprintf(stderr, "[%zu prompt + %zu new tokens, %.1f tokens/s, %d threads%s]\n", prompt_ids.size(),
                   ids.size(), ids.size() / seconds, at::get_num_threads(), use_cache ? "" : ", no cache");
    }
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bpt::app::run("bpt-generate", [&] { return generate(argc, argv); });
}
