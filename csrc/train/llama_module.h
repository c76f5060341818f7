#pragma once
// LLaMA as a TrainModule: the training step is the chunked loss over packed rows; weights are
// saved in Hugging Face's layout (config.json + safetensors), so every checkpoint loads in
// transformers and bpt-generate.
//
// A model with LoRA adapters (LlamaForCausalLMImpl::add_lora) trains only those: its
// checkpoints are peft adapter directories (csrc/io/lora_adapter.h) naming `lora_base`, the
// frozen base's directory, which is read again on resume.
//
// shard() puts it under FSDP (csrc/dist/fsdp.h): one unit per decoder layer, and a root unit
// for the embeddings, final norm and head. Its checkpoints are then sharded
// (csrc/io/sharded_checkpoint.h); every world size, 1 included, loads both kinds.
#include <memory>

#include "csrc/dist/fsdp.h"
#include "csrc/train/module.h"
#include "csrc/train/remat.h"
#include "models/llama/llama.h"

namespace bpt::train {

// InputError unless `config`'s experts can be placed over `fsdp` ranks (--expert_parallel):
// an MoE model whose num_local_experts is a multiple of fsdp.
void check_expert_parallel(const models::llama::LlamaConfig& config, int64_t fsdp);

class LlamaModule : public TrainModule {
 public:
  LlamaModule(models::llama::LlamaForCausalLM model, RematPolicy remat);

  // Shards the model over mesh.fsdp_group (replicated over mesh.dp_group). Every rank must
  // hold the same weights when it is called. Under FSDP a layer's parameters are freed after
  // its forward, so nothing_saveable and checkpoint_dots both recompute the whole layer in
  // backward; everything_saveable keeps each layer gathered, with its activations, until the
  // step's backward is done.
  // expert_parallel: each MoE layer's experts are placed across the fsdp group instead
  // (csrc/dist/expert_parallel.h; E a multiple of the group's size), tokens exchanged by all-to-all.
  void shard(const dist::Mesh& mesh, dist::FsdpOptions options = {}, bool expert_parallel = false);

  // Moves the model (before shard()) and from then on each batch to `device`.
  void to(at::Device device);

  StepOutput training_step(const data::Batch& batch) override;
  std::optional<StepOutput> validation_step(const data::Batch& batch) override;
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() override;
  void save(const std::string& dir) const override;
  void load(const std::string& dir) override;
  // PaLM's count: 6 x (parameters in matmuls; 4 x for frozen ones) + 12 x layers x hidden x
  // seq_length (attention).
  double flops_per_token(int64_t seq_length) const override;
  void save_optimizer(const std::string& dir, const AdamW& optimizer) const override;
  bool load_optimizer(const std::string& dir, AdamW& optimizer) override;
  const ShardedParameters* sharding() const override { return fsdp_ ? &sharding_ : nullptr; }
  void finish_backward() override;
  int64_t held_bytes() override;
  int64_t communicated_bytes() const override {
    return (fsdp_ ? fsdp_->communicated_bytes() : 0) + *exchanged_bytes_;
  }

  models::llama::LlamaForCausalLM model;
  std::string tokenizer_file;  // copied into each checkpoint as tokenizer.model, if set
  std::string lora_base;       // with adapters: the base model's directory, for adapter_config.json

 private:
  RematPolicy remat_;
  at::Device device_ = at::kCPU;
  std::unique_ptr<dist::Fsdp> fsdp_;
  ShardedParameters sharding_;
  std::shared_ptr<int64_t> exchanged_bytes_ = std::make_shared<int64_t>(0);  // expert parallelism's all-to-alls
  double flops_matmul_ = 0;  // training FLOPs per token in matmuls, counted before sharding empties the parameters
};

}  // namespace bpt::train
