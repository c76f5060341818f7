#pragma once
// Everything bpt-train is told, under llamabpt's flag names (see register_flags for the full
// list with defaults and help; `bpt-train --help` prints it).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "csrc/dist/fsdp.h"
#include "csrc/io/flags.h"
#include "csrc/train/adamw.h"
#include "csrc/train/trainer.h"

namespace bpt::train {

struct DatasetConfig {
  std::string type = "json";  // json or synthetic
  std::string fields = "text";  // text_processor.fields
  bool add_bos_token = true, add_eos_token = true;
  std::string path;  // json_dataset.path: one file or a comma-separated list
  int64_t seq_length = 1024, batch_size = 8, tokenizer_processes = 1;
  bool shuffle = true;
};

// Fine-tuning: every parameter (full), or LoRA adapters on a frozen base (csrc/nn/lora_linear.h).
struct FinetuneConfig {
  std::string mode = "full";  // full or lora
  int64_t lora_rank = 32;
  double lora_alpha = 32, lora_dropout = 0;
  std::string lora_target = "all";  // all, attention, mlp, or projection names (q_proj,v_proj)
};

struct TrainConfig {
  std::string model = "llama";   // llama, bllama (BitLinear layers: models/bllama) or glam (MoE)
  std::string load_llama_config;  // a preset or a directory holding config.json; empty: the
                                  // checkpoint's config.json with load_checkpoint, else tiny
  std::string update_llama_config;          // "field=value,..."
  std::vector<std::pair<std::string, std::string>> llama_overrides;  // --llama.<field>, in order
  std::string dtype = "float32";
  std::string device = "cpu";  // cpu, or cuda: rank r on GPU LOCAL_RANK, NCCL between ranks

  // Steps, logging, saving, evaluation, resuming, output_dir, progress (the trainer's own).
  TrainerOptions trainer;
  std::string load_checkpoint;  // "params::DIR", "trainstate::DIR" or "hf::DIR"
  FinetuneConfig finetune;
  std::string load_dataset_state;
  std::string tokenizer_vocab_file;

  std::string optimizer_type = "adamw";
  AdamWOptions adamw;

  DatasetConfig train_dataset, eval_dataset;
  int64_t seed = 42;

  // Distributed runs (launched by torchrun or tools/launch).
  std::string mesh_dim = "1,-1,1";
  dist::FsdpOptions fsdp;
  bool expert_parallel = false;  // MoE experts placed across the fsdp group (LlamaModule::shard)
  int64_t dist_timeout_s = 600;
};

// Registers every field of `config` in `flags` under its llamabpt name.
void register_flags(TrainConfig& config, io::FlagSet& flags);

}  // namespace bpt::train
