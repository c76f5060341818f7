#include "csrc/nn/checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <optional>

namespace bpt::nn {
namespace {

// fn travels to backward inside the context as a capsule.
struct FnHolder : torch::CustomClassHolder {
  FnHolder(TensorFn f, CheckpointHooks h) : fn(std::move(f)), hooks(std::move(h)) {}
  TensorFn fn;
  CheckpointHooks hooks;
};

// The default generator of the inputs' GPU, if they are on one: dropout there draws from it.
std::optional<at::Generator> gpu_generator(at::TensorList inputs) {
  for (const at::Tensor& input : inputs) {
    if (input.defined() && input.is_cuda()) return at::globalContext().defaultGenerator(input.device());
  }
  return std::nullopt;
}

class Checkpoint : public torch::autograd::Function<Checkpoint> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const TensorFn& fn,
                                                const CheckpointHooks& hooks, at::TensorList inputs) {
    ctx->saved_data["fn"] = c10::IValue::make_capsule(c10::make_intrusive<FnHolder>(fn, hooks));
    ctx->saved_data["rng"] = at::detail::getDefaultCPUGenerator().get_state();
    if (const auto gpu = gpu_generator(inputs)) ctx->saved_data["gpu_rng"] = gpu->get_state();
    c10::List<bool> needs_grad;
    for (const at::Tensor& input : inputs) needs_grad.push_back(input.requires_grad());
    ctx->saved_data["needs_grad"] = needs_grad;
    ctx->save_for_backward(inputs.vec());
    // Grad mode is off here: fn runs without building a graph.
    if (hooks.before_forward) hooks.before_forward();
    auto outputs = fn(inputs.vec());
    if (hooks.after_forward) hooks.after_forward();
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto* holder = static_cast<const FnHolder*>(ctx->saved_data["fn"].toCapsule().get());
    const auto needs_grad = ctx->saved_data["needs_grad"].toBoolList();
    std::vector<at::Tensor> inputs;
    const auto saved = ctx->get_saved_variables();
    for (size_t i = 0; i < saved.size(); ++i) inputs.push_back(saved[i].detach().requires_grad_(needs_grad[i]));

    // Recompute under the random state the forward saw (the CPU's, and the GPU's for inputs
    // on one), then put the current one back.
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    const at::Tensor rng_now = generator.get_state();
    generator.set_state(ctx->saved_data["rng"].toTensor());
    std::optional<at::Generator> gpu = gpu_generator(inputs);
    const at::Tensor gpu_rng_now = gpu ? gpu->get_state() : at::Tensor();
    if (gpu) gpu->set_state(ctx->saved_data["gpu_rng"].toTensor());
    if (holder->hooks.before_recompute) holder->hooks.before_recompute();
    std::vector<at::Tensor> outputs;
    {
      at::AutoGradMode grad_mode(true);
      outputs = holder->fn(inputs);
    }
    generator.set_state(rng_now);
    if (gpu) gpu->set_state(gpu_rng_now);

    std::vector<at::Tensor> roots, root_grads;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        root_grads.push_back(grad_outputs[i]);
      }
    }
    // Accumulates into the parameters' .grad and into the detached inputs' .grad.
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    if (holder->hooks.after_backward) holder->hooks.after_backward();
    torch::autograd::variable_list grads = {at::Tensor(), at::Tensor()};  // for fn and hooks
    for (const at::Tensor& input : inputs) grads.push_back(input.requires_grad() ? input.grad() : at::Tensor());
    return grads;
  }
};

}  // namespace

std::vector<at::Tensor> checkpoint(const TensorFn& fn, const std::vector<at::Tensor>& inputs,
                                   const CheckpointHooks& hooks) {
  // Backward reaches the parameters inside fn only through an input that requires grad;
  // without one (or without grad mode) there is nothing to recompute for.
  const bool any_grad = std::any_of(inputs.begin(), inputs.end(), [](const at::Tensor& t) { return t.requires_grad(); });
  if (!at::GradMode::is_enabled() || !any_grad) {
    if (hooks.before_forward) hooks.before_forward();
    auto outputs = fn(inputs);
    if (hooks.after_forward) hooks.after_forward();
    return outputs;
  }
  return Checkpoint::apply(fn, hooks, at::TensorList(inputs));
}

}  // namespace bpt::nn
