#pragma once
// Everything bpt-train is told, under llamabpt's flag names (see register_flags for the full
// list with defaults and help; `bpt-train --help` prints it).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "csrc/io/flags.h"
#include "csrc/train/adamw.h"

namespace bpt::train {

struct DatasetConfig {
  std::string type = "json";  // json or synthetic
  std::string fields = "text";  // text_processor.fields
  bool add_bos_token = true, add_eos_token = true;
  std::string path;  // json_dataset.path: one file or a comma-separated list
  int64_t seq_length = 1024, batch_size = 8, tokenizer_processes = 1;
  bool shuffle = true;
};

struct TrainConfig {
  std::string load_llama_config = "tiny";  // a preset, or a directory holding config.json
  std::string update_llama_config;          // "field=value,..."
  std::vector<std::pair<std::string, std::string>> llama_overrides;  // --llama.<field>, in order
  std::string dtype = "float32";

  int64_t total_steps = 1000, log_freq = 10, save_model_freq = 0, save_milestone_freq = 0;
  int64_t eval_freq = 0, eval_steps = 10;
  std::string load_checkpoint;  // "params::DIR", "trainstate::DIR" or "hf::DIR"
  std::string load_dataset_state;
  std::string tokenizer_vocab_file;

  std::string optimizer_type = "adamw";
  AdamWOptions adamw;
  int64_t accumulate_gradient_steps = 1;

  DatasetConfig train_dataset, eval_dataset;
  bool save_optimizer_state = true;
  bool autoresume = false;
  int64_t seed = 42;
  std::string output_dir = "runs/default";
  double peak_flops = 0;  // per second; 0: measured once with a matmul
  std::string progress = "auto";  // auto (a bar on a terminal), always, never
};

// Registers every field of `config` in `flags` under its llamabpt name.
void register_flags(TrainConfig& config, io::FlagSet& flags);

}  // namespace bpt::train
