// Your own model trained by bpt's Trainer: schedule, clipping, accumulation, checkpoints,
// autoresume, metrics.jsonl and the progress bar come with it. Built as build/example-custom-module.
#include <ATen/ATen.h>
#include <torch/nn/modules/embedding.h>

#include "csrc/io/safetensors.h"
#include "csrc/train/trainer.h"

// A bigram language model: the next token's logits from the current token alone.
struct Bigram : bpt::train::TrainModule {
  torch::nn::Embedding table{256, 256};

  bpt::train::StepOutput training_step(const bpt::data::Batch& batch) override {
    const at::Tensor logits = table(batch.input_ids).flatten(0, 1);  // [B*T, 256]
    return {at::cross_entropy_loss(logits, batch.targets.flatten()), batch.targets.numel()};
  }
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() override { return {{"table", table->weight}}; }
  void save(const std::string& dir) const override {
    bpt::io::save_safetensors(dir + "/model.safetensors", {{"table", table->weight}});
  }
  void load(const std::string& dir) override {
    at::NoGradGuard no_grad;
    table->weight.copy_(bpt::io::SafetensorsFile(dir + "/model.safetensors").tensor("table"));
  }
};

int main() {
  Bigram model;
  bpt::data::SyntheticLoader data(/*vocab_size=*/256, /*seq_length=*/64, /*batch_size=*/8, /*seed=*/0);
  bpt::train::TrainerOptions options;
  options.total_steps = 50;
  options.output_dir = "runs/bigram";
  options.autoresume = true;
  bpt::train::AdamWOptions adamw;
  adamw.lr = 1e-2;
  const auto result = bpt::train::Trainer(options, adamw).fit(model, data);
  std::printf("step %lld, loss %.3f\n", static_cast<long long>(result.steps), result.last_loss);
}
