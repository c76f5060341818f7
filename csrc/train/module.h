#pragma once
// What the trainer needs from a model, in the spirit of a Lightning module: a training step
// that returns the loss, an optional validation step, the parameters to train, and how to save
// and load its weights. Anything implementing it gets bpt's schedule, clipping, accumulation,
// checkpoints, metrics and progress display (docs/training.md has a 30-line example).
#include <ATen/core/Tensor.h>

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "csrc/data/loader.h"
#include "csrc/train/adamw.h"

namespace bpt::train {

struct StepOutput {
  at::Tensor loss;        // scalar, differentiable in training_step
  int64_t n_tokens = 0;   // tokens the loss counted
  int64_t n_correct = 0;  // of those, argmax == target (0 if not tracked)
  // More values to log (say, router losses), averaged over the micro-batches of a log window
  // (this rank's: not summed over ranks).
  std::map<std::string, double> metrics;
};

class TrainModule {
 public:
  virtual ~TrainModule() = default;
  virtual StepOutput training_step(const data::Batch& batch) = 0;
  // Runs under no_grad; nullopt: the module has no validation.
  virtual std::optional<StepOutput> validation_step(const data::Batch& /*batch*/) { return std::nullopt; }
  // The parameters the optimizer updates, with names (weight-decay masks go by name).
  virtual std::vector<std::pair<std::string, at::Tensor>> named_parameters() = 0;
  // Adjusts the trainer's optimizer settings (say, another learning rate for this model).
  virtual AdamWOptions configure_optimizers(AdamWOptions defaults) { return defaults; }
  // Writes the weights into the existing directory `dir`, and reads them back.
  virtual void save(const std::string& dir) const = 0;
  virtual void load(const std::string& dir) = 0;
  // Training FLOPs per token at this sequence length, for MFU; 0: unknown.
  virtual double flops_per_token(int64_t /*seq_length*/) const { return 0; }

  // Optimizer state beside the weights in a checkpoint directory: by default one
  // optimizer.safetensors; load_optimizer also reads what FSDP ranks wrote (any world size)
  // and returns false if `dir` holds no optimizer state.
  virtual void save_optimizer(const std::string& dir, const AdamW& optimizer) const;
  virtual bool load_optimizer(const std::string& dir, AdamW& optimizer);

  // Distributed training (FSDP: csrc/dist/fsdp.h). A module whose named_parameters() are
  // shards says so here, for the optimizer's global norm and weight-decay masks.
  virtual const ShardedParameters* sharding() const { return nullptr; }
  // Called after the last micro-batch's backward of a step, before the update (FSDP reduces
  // the gradients here).
  virtual void finish_backward() {}
  // Bytes this process holds in parameters and their gradients (the memory report).
  virtual int64_t held_bytes();
  // Bytes this process has passed to collectives so far (0 when not distributed).
  virtual int64_t communicated_bytes() const { return 0; }
};

}  // namespace bpt::train
