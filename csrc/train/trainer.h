#pragma once
// The training loop, a class users call from C++ (bpt-train is a thin main over it):
//
//   for step in [start, total_steps):
//     for each of accumulate_gradient_steps micro-batches: loss = module.training_step(batch);
//                                                          (loss / accumulate).backward()
//     AdamW: clip by global norm, skip if not finite, update   (schedule by update count)
//     every log_freq: metrics.jsonl line (+ progress bar); every eval_freq: validation;
//     every save_model_freq / save_milestone_freq: checkpoint (atomic)
//
// Resuming (--autoresume, or load_checkpoint=trainstate::DIR) restores weights, optimizer,
// step, data position and random state, so a resumed run continues exactly as one that never
// stopped (given the optimizer state was saved). Every evaluation reads the same eval
// batches. SIGINT/SIGTERM finish the current step, save a checkpoint and return; a second
// signal ends the process at once.
//
// Distributed (a `world` of several ranks, each running fit() on its own process): every
// rank's loader yields the same global batch of batch_size rows and the rank keeps its
// slice of rows; losses are weighted by tokens across ranks, so the run follows the same
// path as one process with the whole batch. Rank 0 alone logs and prints.
#include <cstdint>
#include <string>

#include "csrc/data/loader.h"
#include "csrc/dist/process_group.h"
#include "csrc/train/adamw.h"
#include "csrc/train/module.h"

namespace bpt::train {

struct TrainerOptions {
  int64_t total_steps = 1000;
  int64_t accumulate_gradient_steps = 1;
  int64_t log_freq = 10;
  int64_t save_model_freq = 0;      // 0: save at the end only
  int64_t save_milestone_freq = 0;  // 0: no milestones
  int64_t eval_freq = 0, eval_steps = 10;
  bool save_optimizer_state = true;
  bool autoresume = false;
  std::string resume_from;  // a checkpoint directory (trainstate::DIR)
  std::string output_dir = "runs/default";
  int64_t seq_length = 0;   // for MFU
  double peak_flops = 0;    // 0: measured once
  std::string progress = "auto";
  int64_t save_delay_ms = 0;  // a pause inside each checkpoint save (crash tests only)
  // The run's settings, kept in each checkpoint's trainer_state.json as "config".
  std::vector<std::pair<std::string, std::string>> run_config;
};

struct FitResult {
  int64_t steps = 0;          // the step reached
  int64_t skipped_steps = 0;  // updates skipped for a non-finite gradient
  double last_loss = 0;
  bool interrupted = false;
};

class Trainer {
 public:
  Trainer(TrainerOptions options, AdamWOptions adamw, dist::Group world = {});
  // Trains `module` on `train` (and validates on `eval` if given).
  FitResult fit(TrainModule& module, data::DataLoader& train, data::DataLoader* eval = nullptr);

 private:
  TrainerOptions options_;
  AdamWOptions adamw_;
  dist::Group world_;
};

// Rows [rank * B / ranks, (rank + 1) * B / ranks) of every tensor of `batch`; InputError if
// ranks does not divide the batch size B.
data::Batch slice_rows(const data::Batch& batch, int64_t rank, int64_t ranks);

// FLOP/s of a matmul in `dtype` on `device` (2048^3 on the CPU, 8192^3 on a GPU): the peak
// MFU is measured against.
double measure_peak_flops(at::ScalarType dtype, at::Device device = at::kCPU);

}  // namespace bpt::train
