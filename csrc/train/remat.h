#pragma once
// Rematerialisation (gradient checkpointing) for C++, which has no torch.utils.checkpoint:
// checkpoint(fn, inputs) runs fn without keeping its activations for backward; the backward
// pass runs fn again from the saved inputs (with the CPU random state of the first run, so
// dropout draws the same mask) and back-propagates through the recomputation. Parameters
// used inside fn get their gradients as usual.
//
// llamabpt's --llama.remat_policy, per transformer block:
//   nothing_saveable     the whole block is recomputed in backward; only its input is kept
//   checkpoint_dots      llamabpt keeps the block's matmul outputs; bpt approximates it by
//                        recomputing the two residual halves of the block apart (below)
//   everything_saveable  no recomputation
#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <vector>

namespace bpt::models::llama {
class LlamaModelImpl;
}

namespace bpt::train {

using TensorFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;

// Outputs of fn(inputs), with a backward that recomputes fn. Inputs that do not require grad
// (masks, rotary angles) are saved and passed as they are.
std::vector<at::Tensor> checkpoint(const TensorFn& fn, const std::vector<at::Tensor>& inputs);

enum class RematPolicy { NothingSaveable, CheckpointDots, EverythingSaveable };

// "nothing_saveable" -> NothingSaveable, ...; InputError naming llama.remat_policy otherwise.
RematPolicy parse_remat_policy(const std::string& name);

// Sets how `model` runs its layers under `policy`. bpt's blockwise ops keep no [T, T] or
// [T, hidden] intermediates of their own, so checkpoint_dots comes down to recomputing each
// residual half of a layer (attention, then MLP) apart, keeping the residual stream between
// them (h + o_proj(attention)); nothing_saveable recomputes the whole layer from its input.
void apply_remat(models::llama::LlamaModelImpl& model, RematPolicy policy);

}  // namespace bpt::train
