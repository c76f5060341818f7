#pragma once
// Activation checkpointing for C++, which has no torch.utils.checkpoint: checkpoint(fn,
// inputs) runs fn without keeping its activations for backward; the backward pass runs fn
// again from the saved inputs (with the random state of the first run, the CPU's and that of
// the inputs' GPU, so dropout draws the same mask) and back-propagates through the
// recomputation. Parameters used inside fn
// get their gradients as usual.
//
// Hooks let a caller act around both runs: the FSDP wrapper (csrc/dist/fsdp.h) gathers a
// unit's parameters before each run, frees them after, and reduce-scatters their gradients
// once the recomputation has back-propagated.
#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace bpt::nn {

using TensorFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

struct CheckpointHooks {
  std::function<void()> before_forward, after_forward;     // around fn in the forward pass
  std::function<void()> before_recompute, after_backward;  // around the recomputation + its backward
};

// Outputs of fn(inputs), with a backward that recomputes fn. Inputs that do not require grad
// (masks, rotary angles) are saved and passed as they are. Without grad mode, or with no
// input that requires grad, fn simply runs (between before_forward and after_forward).
std::vector<at::Tensor> checkpoint(const TensorFn& fn, const std::vector<at::Tensor>& inputs,
                                   const CheckpointHooks& hooks = {});

}  // namespace bpt::nn
