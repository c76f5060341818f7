#pragma once
// Rematerialisation (gradient checkpointing) policies over nn::checkpoint (csrc/nn/checkpoint.h).
//
// llamabpt's --llama.remat_policy, per transformer block:
//   nothing_saveable     the whole block is recomputed in backward; only its input is kept
//   checkpoint_dots      llamabpt keeps the block's matmul outputs; bpt approximates it by
//                        recomputing the two residual halves of the block apart (below)
//   everything_saveable  no recomputation
#include <string>

namespace bpt::models::llama {
class LlamaModelImpl;
}

namespace bpt::train {

enum class RematPolicy { NothingSaveable, CheckpointDots, EverythingSaveable };

// "nothing_saveable" -> NothingSaveable, ...; InputError naming llama.remat_policy otherwise.
RematPolicy parse_remat_policy(const std::string& name);

// Sets how `model` runs its layers under `policy`. bpt's blockwise ops keep no [T, T] or
// [T, hidden] intermediates of their own, so checkpoint_dots comes down to recomputing each
// residual half of a layer (attention, then MLP) apart, keeping the residual stream between
// them (h + o_proj(attention)); nothing_saveable recomputes the whole layer from its input.
void apply_remat(models::llama::LlamaModelImpl& model, RematPolicy policy);

}  // namespace bpt::train
