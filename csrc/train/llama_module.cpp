#include "csrc/train/llama_module.h"

#include <ATen/ATen.h>

#include <filesystem>

#include "csrc/io/hf_checkpoint.h"

namespace bpt::train {

LlamaModule::LlamaModule(models::llama::LlamaForCausalLM model_, RematPolicy remat) : model(std::move(model_)) {
  apply_remat(*model->model, remat);
}

StepOutput LlamaModule::training_step(const data::Batch& batch) {
  const nn::LMLoss out = model->forward(batch.input_ids, batch.targets, batch.segment_ids);
  return {out.loss, out.n_tokens.item<int64_t>(), out.n_correct.item<int64_t>()};
}

std::optional<StepOutput> LlamaModule::validation_step(const data::Batch& batch) {
  at::NoGradGuard no_grad;
  return training_step(batch);
}

std::vector<std::pair<std::string, at::Tensor>> LlamaModule::named_parameters() {
  std::vector<std::pair<std::string, at::Tensor>> result;
  for (const auto& item : model->named_parameters()) result.emplace_back(item.key(), item.value());
  return result;
}

void LlamaModule::save(const std::string& dir) const {
  io::write_llama(*model, dir);
  if (!tokenizer_file.empty()) {
    std::filesystem::copy_file(tokenizer_file, std::filesystem::path(dir) / "tokenizer.model",
                               std::filesystem::copy_options::overwrite_existing);
  }
}

void LlamaModule::load(const std::string& dir) { io::load_llama_weights(*model, dir); }

double LlamaModule::flops_per_token(int64_t seq_length) const {
  const auto& c = model->config;
  double matmul_params = 0;
  for (const auto& item : model->named_parameters()) {
    if (item.key() != "model.embed_tokens.weight" && item.value().dim() == 2) matmul_params += item.value().numel();
  }
  if (c.tie_word_embeddings) matmul_params += static_cast<double>(c.vocab_size * c.hidden_size);  // the head
  return 6 * matmul_params + 12.0 * c.num_hidden_layers * c.num_attention_heads * c.resolved_head_dim() * seq_length;
}

}  // namespace bpt::train
