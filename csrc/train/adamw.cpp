#include "csrc/train/adamw.h"

#include <ATen/ATen.h>

#include <cmath>

#include "csrc/common/error.h"

namespace bpt::train {

void AdamWOptions::validate() const {
  if (!(lr >= 0)) throw_input_error("optimizer.adamw_optimizer.lr: expected >= 0, got {}", lr);
  if (!(init_lr >= 0)) throw_input_error("optimizer.adamw_optimizer.init_lr: expected >= 0, got {}", init_lr);
  if (!(end_lr >= 0)) throw_input_error("optimizer.adamw_optimizer.end_lr: expected >= 0, got {}", end_lr);
  if (lr_warmup_steps < 0) throw_input_error("optimizer.adamw_optimizer.lr_warmup_steps: expected >= 0, got {}", lr_warmup_steps);
  if (lr_decay_steps < 0) throw_input_error("optimizer.adamw_optimizer.lr_decay_steps: expected >= 0, got {}", lr_decay_steps);
  if (lr_decay_steps > 0 && lr_decay_steps < lr_warmup_steps) {
    throw_input_error("optimizer.adamw_optimizer.lr_decay_steps: {} is shorter than lr_warmup_steps {} (decay steps "
                      "count the warm-up)", lr_decay_steps, lr_warmup_steps);
  }
  if (lr_schedule != "cosine" && lr_schedule != "linear") {
    throw_input_error("optimizer.adamw_optimizer.lr_schedule: expected cosine or linear, got '{}'", lr_schedule);
  }
  if (!(weight_decay >= 0)) throw_input_error("optimizer.adamw_optimizer.weight_decay: expected >= 0, got {}", weight_decay);
  if (!(b1 >= 0 && b1 < 1)) throw_input_error("optimizer.adamw_optimizer.b1: expected in [0, 1), got {}", b1);
  if (!(b2 >= 0 && b2 < 1)) throw_input_error("optimizer.adamw_optimizer.b2: expected in [0, 1), got {}", b2);
  if (!(eps > 0)) throw_input_error("optimizer.adamw_optimizer.eps: expected > 0, got {}", eps);
  if (!(clip_gradient >= 0)) throw_input_error("optimizer.adamw_optimizer.clip_gradient: expected >= 0, got {}", clip_gradient);
}

double learning_rate(const AdamWOptions& o, int64_t step) {
  if (step < o.lr_warmup_steps) {
    return o.init_lr + (o.lr - o.init_lr) * static_cast<double>(step) / static_cast<double>(o.lr_warmup_steps);
  }
  if (o.lr_decay_steps <= o.lr_warmup_steps) return o.lr_decay_steps > 0 ? o.end_lr : o.lr;
  if (step >= o.lr_decay_steps) return o.end_lr;
  const double progress =
      static_cast<double>(step - o.lr_warmup_steps) / static_cast<double>(o.lr_decay_steps - o.lr_warmup_steps);
  const double remaining = o.lr_schedule == "cosine" ? 0.5 * (1 + std::cos(M_PI * progress)) : 1 - progress;
  return o.end_lr + (o.lr - o.end_lr) * remaining;
}

bool decays(const std::string& name, at::IntArrayRef sizes, const AdamWOptions& options) {
  if (sizes.size() < 2) return false;
  return options.decay_embeddings || name.find("embed") == std::string::npos;
}

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> parameters, AdamWOptions options,
             const ShardedParameters* sharding)
    : options_(std::move(options)) {
  if (sharding != nullptr) sum_squares_ = sharding->sum_squares;
  options_.validate();
  at::NoGradGuard no_grad;
  for (auto& [name, param] : parameters) {
    Slot slot;
    slot.name = name;
    slot.param = param;
    slot.master = param.scalar_type() == at::kFloat ? param : param.detach().to(at::kFloat);
    slot.exp_avg = at::zeros_like(slot.master);
    slot.exp_avg_sq = at::zeros_like(slot.master);
    slot.step = at::zeros({}, slot.master.options());
    slot.decay = decays(name, sharding != nullptr ? at::IntArrayRef(sharding->shapes.at(name)) : param.sizes(),
                        options_);
    slots_.push_back(std::move(slot));
  }
}

StepReport AdamW::step() {
  at::NoGradGuard no_grad;
  StepReport report;
  report.lr = learning_rate(options_, steps_done_);

  std::vector<at::Tensor> grads;
  for (Slot& slot : slots_) {
    const at::Tensor& grad = slot.param.grad();
    grads.push_back(grad.defined() ? grad.to(at::kFloat) : at::zeros_like(slot.master));
  }
  // Global norm: the norm of the per-tensor norms (fp32 tensors, fp64 for the last sum), over
  // every shard when the parameters are pieces.
  double sum_squares = 0;
  if (!grads.empty()) sum_squares = at::stack(at::_foreach_norm(grads, 2)).to(at::kDouble).pow(2).sum().item<double>();
  if (sum_squares_) sum_squares = sum_squares_(sum_squares);
  report.grad_norm = std::sqrt(sum_squares);
  for (Slot& slot : slots_) slot.param.mutable_grad() = at::Tensor();
  if (!std::isfinite(report.grad_norm)) {
    report.skipped = true;  // steps_done_ stays: the schedule does not advance either
    return report;
  }
  if (options_.clip_gradient > 0 && report.grad_norm > options_.clip_gradient) {
    const double scale = options_.clip_gradient / report.grad_norm;  // optax: clip / max(norm, clip)
    for (at::Tensor& grad : grads) grad.mul_(scale);
  }
  for (const bool decay : {true, false}) {
    std::vector<at::Tensor> params, group_grads, exp_avgs, exp_avg_sqs, steps;
    for (size_t i = 0; i < slots_.size(); ++i) {
      if (slots_[i].decay != decay) continue;
      params.push_back(slots_[i].master);
      group_grads.push_back(grads[i]);
      exp_avgs.push_back(slots_[i].exp_avg);
      exp_avg_sqs.push_back(slots_[i].exp_avg_sq);
      steps.push_back(slots_[i].step);
    }
    if (params.empty()) continue;
    at::_foreach_add_(steps, 1.0);  // the kernel expects this update's step number, as torch.optim passes it
    at::_fused_adamw_(params, group_grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, report.lr,
                      options_.b1, options_.b2, decay ? options_.weight_decay : 0.0, options_.eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  }
  for (Slot& slot : slots_) {
    if (!slot.master.is_same(slot.param)) slot.param.copy_(slot.master);
  }
  ++steps_done_;
  return report;
}

void AdamW::restart_at(int64_t steps) {
  at::NoGradGuard no_grad;
  steps_done_ = steps;
  for (Slot& slot : slots_) {
    if (!slot.master.is_same(slot.param)) slot.master.copy_(slot.param);
    slot.step.fill_(static_cast<double>(steps));
  }
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, at::Tensor>> result;
  result.emplace_back("step", at::tensor({steps_done_}, at::kLong));
  for (const Slot& slot : slots_) {
    result.emplace_back(slot.name + ".exp_avg", slot.exp_avg);
    result.emplace_back(slot.name + ".exp_avg_sq", slot.exp_avg_sq);
    if (!slot.master.is_same(slot.param)) result.emplace_back(slot.name + ".master", slot.master);
  }
  return result;
}

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const Slot& slot : slots_) {
    bytes += slot.exp_avg.nbytes() + slot.exp_avg_sq.nbytes();
    if (!slot.master.is_same(slot.param)) bytes += slot.master.nbytes();
  }
  return bytes;
}

void AdamW::load_state(const std::function<at::Tensor(const std::string&)>& lookup) {
  at::NoGradGuard no_grad;
  const at::Tensor step = lookup("step");
  steps_done_ = step.item<int64_t>();
  for (Slot& slot : slots_) {
    for (auto& [suffix, target] : {std::pair<const char*, at::Tensor*>{".exp_avg", &slot.exp_avg},
                                   {".exp_avg_sq", &slot.exp_avg_sq}}) {
      const at::Tensor value = lookup(slot.name + suffix);
      if (value.sizes() != target->sizes()) {
        throw_input_error("optimizer state '{}{}': shape {}, expected {}", slot.name, suffix, value.sizes(),
                          target->sizes());
      }
      target->copy_(value);
    }
    slot.step.fill_(static_cast<double>(steps_done_));
    if (!slot.master.is_same(slot.param)) {
      const at::Tensor master = lookup(slot.name + ".master");
      if (master.sizes() != slot.master.sizes()) {
        throw_input_error("optimizer state '{}.master': shape {}, expected {}", slot.name, master.sizes(),
                          slot.master.sizes());
      }
      slot.master.copy_(master);
    }
  }
}

}  // namespace bpt::train
