// bpt-tokenizer: trains a SentencePiece tokenizer (LLaMA's kind: BPE with byte fallback) on
// text or JSONL files, writing <output>/tokenizer.model for bpt-train and bpt-generate.
//
//   bpt-tokenizer --input corpus.jsonl --field text --vocab_size 8000 --output runs/tok

#include <sentencepiece_trainer.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "apps/app.h"
#include "csrc/data/jsonl.h"

namespace {

using bpt::throw_input_error;
namespace fs = std::filesystem;

int tokenizer(int argc, char** argv) {
  CLI::App app{"Train a SentencePiece tokenizer (BPE, byte fallback) for bpt", "bpt-tokenizer"};
  std::vector<std::string> inputs;
  std::string output, field = "text", model_type = "bpe";
  int64_t vocab_size = 8000;
  app.add_option("--input", inputs, "Text files (one sentence or paragraph per line) or .jsonl files")->required();
  app.add_option("--field", field, "The JSONL field holding the text")->capture_default_str();
  app.add_option("--output", output, "Directory for tokenizer.model (created)")->required();
  app.add_option("--vocab_size", vocab_size, "Pieces in the vocabulary")->capture_default_str();
  app.add_option("--model_type", model_type, "bpe (as LLaMA) or unigram")
      ->check(CLI::IsMember({"bpe", "unigram"}))
      ->capture_default_str();
  if (const int code = bpt::app::parse(app, argc, argv); code >= 0) return code;
  bpt::app::reject_extras(app, app.remaining());

  // SentencePiece reads text lines: JSONL inputs are written out as their field's text.
  fs::create_directories(output);
  const std::string text_path = (fs::path(output) / ("corpus.txt.tmp-" + std::to_string(::getpid()))).string();
  std::vector<std::string> text_inputs;
  for (const std::string& input : inputs) {
    if (!input.ends_with(".jsonl")) {
      if (!fs::exists(input)) throw_input_error("{}: no such file", input);
      text_inputs.push_back(input);
      continue;
    }
    const bpt::data::JsonlCorpus corpus({input});
    std::ofstream text(text_path, std::ios::app);
    for (int64_t i = 0; i < corpus.size(); ++i) {
      const nlohmann::json doc = corpus.document(i);
      if (!doc.contains(field) || !doc[field].is_string()) {
        throw_input_error("{}: no string field '{}'", corpus.where(i), field);
      }
      std::string value = doc[field].get<std::string>();
      std::replace(value.begin(), value.end(), '\n', ' ');
      text << value << "\n";
    }
    if (std::find(text_inputs.begin(), text_inputs.end(), text_path) == text_inputs.end()) {
      text_inputs.push_back(text_path);
    }
  }
  std::string joined;
  for (const std::string& input : text_inputs) joined += (joined.empty() ? "" : ",") + input;
  const std::string args = fmt::format(
      "--input={} --model_prefix={} --vocab_size={} --model_type={} --character_coverage=1.0 --byte_fallback=true "
      "--split_digits=true --bos_id=1 --eos_id=2 --unk_id=0 --pad_id=-1 --minloglevel=1",
      joined, (fs::path(output) / "tokenizer").string(), vocab_size, model_type);
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  fs::remove(text_path);
  fs::remove(fs::path(output) / "tokenizer.vocab");
  if (!status.ok()) throw_input_error("SentencePiece training failed: {}", status.ToString());
  std::printf("bpt-tokenizer: %s/tokenizer.model (%lld pieces)\n", output.c_str(), static_cast<long long>(vocab_size));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bpt::app::run("bpt-tokenizer", [&] { return tokenizer(argc, argv); });
}
