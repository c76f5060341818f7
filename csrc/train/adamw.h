#pragma once
// AdamW as llamabpt trains with it (optax's adamw behind clip_by_global_norm, with a
// warm-up + decay schedule): decoupled weight decay masked off norms, biases and
// embeddings, global-norm clipping, fp32 master weights for bf16/fp16 parameters, and a
// guard that skips an update whose gradient is not finite. The update itself is ATen's fused
// AdamW kernel (torch.optim.AdamW(fused=True)).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace bpt::train {

struct AdamWOptions {
  double init_lr = 0.0;       // learning rate at step 0, the start of the warm-up
  double lr = 3e-4;           // peak learning rate
  double end_lr = 3e-5;       // learning rate at and after lr_decay_steps
  int64_t lr_warmup_steps = 0;
  int64_t lr_decay_steps = 0;  // counted from step 0, warm-up included (optax's decay_steps); 0: no decay
  std::string lr_schedule = "cosine";  // "cosine" or "linear" decay after the warm-up
  double weight_decay = 0.1;
  double b1 = 0.9, b2 = 0.95, eps = 1e-8;
  double clip_gradient = 1.0;  // global-norm clip; 0: off
  bool decay_embeddings = false;  // also decay embedding tables (names with "embed")

  // Throws InputError naming the first bad option.
  void validate() const;
};

// The learning rate of update number `step` (0-based): linear warm-up from init_lr to lr over
// lr_warmup_steps updates, then cosine (or linear) decay to end_lr, reached at lr_decay_steps.
double learning_rate(const AdamWOptions& options, int64_t step);

// Whether `name` (a parameter of shape `sizes`) gets weight decay: not 1-D tensors (norm
// weights, biases), not embeddings unless decay_embeddings.
bool decays(const std::string& name, at::IntArrayRef sizes, const AdamWOptions& options);

// For parameters that are this process's pieces of larger tensors (FSDP, csrc/dist/fsdp.h).
struct ShardedParameters {
  std::map<std::string, std::vector<int64_t>> shapes;  // each parameter's whole shape (weight-decay masks)
  std::function<double(double)> sum_squares;           // a local sum of squared gradients -> over all shards
};

struct StepReport {
  double lr = 0;
  double grad_norm = 0;  // before clipping
  bool skipped = false;  // the gradient was not finite: no update
};

class AdamW {
 public:
  // With `sharding`, the parameters are pieces: the global norm sums over every shard.
  AdamW(std::vector<std::pair<std::string, at::Tensor>> parameters, AdamWOptions options,
        const ShardedParameters* sharding = nullptr);

  // One update from the parameters' .grad (missing grads count as zero), then zeroes them.
  StepReport step();

  int64_t steps_done() const { return steps_done_; }
  // Continues the schedule from `steps` updates with fresh moments (a checkpoint saved without
  // optimizer state), and takes the masters from the parameters as they are now.
  void restart_at(int64_t steps);
  const AdamWOptions& options() const { return options_; }

  // Optimizer state as named tensors ("<param>.exp_avg", "<param>.exp_avg_sq", "<param>.master"
  // for bf16/fp16 parameters, and "step"), for checkpoints; load_state takes the same names.
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  void load_state(const std::function<at::Tensor(const std::string&)>& lookup);
  // Bytes of the moments and fp32 masters held.
  int64_t state_bytes() const;

 private:
  struct Slot {
    std::string name;
    at::Tensor param, master, exp_avg, exp_avg_sq, step;  // master: fp32 copy or param itself
    bool decay;
  };
  AdamWOptions options_;
  std::function<double(double)> sum_squares_;
  std::vector<Slot> slots_;
  int64_t steps_done_ = 0;
};

}  // namespace bpt::train
