#pragma once
// LLaMA as a TrainModule: the training step is the chunked loss over packed rows; weights are
// saved in Hugging Face's layout (config.json + safetensors), so every checkpoint loads in
// transformers and bpt-generate.
#include "csrc/train/module.h"
#include "csrc/train/remat.h"
#include "models/llama/llama.h"

namespace bpt::train {

class LlamaModule : public TrainModule {
 public:
  LlamaModule(models::llama::LlamaForCausalLM model, RematPolicy remat);

  StepOutput training_step(const data::Batch& batch) override;
  std::optional<StepOutput> validation_step(const data::Batch& batch) override;
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() override;
  void save(const std::string& dir) const override;
  void load(const std::string& dir) override;
  // PaLM's count: 6 x (parameters in matmuls) + 12 x layers x hidden x seq_length (attention).
  double flops_per_token(int64_t seq_length) const override;

  models::llama::LlamaForCausalLM model;
  std::string tokenizer_file;  // copied into each checkpoint as tokenizer.model, if set
};

}  // namespace bpt::train
