#pragma once
// LLaMA's SwiGLU MLP over bpt::blockwise_ffn: down(silu(gate(x)) * up(x)), computed over
// chunks of tokens. Submodules are named as Hugging Face's (gate_proj, up_proj, down_proj).

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <vector>

#include "csrc/nn/lora_linear.h"

namespace bpt::nn {

struct BlockwiseFeedForwardOptions {
  BlockwiseFeedForwardOptions(int64_t dim, int64_t hidden_dim) : dim_(dim), hidden_dim_(hidden_dim) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, hidden_dim);
  // Tokens per chunk (llamabpt's ffn_chunk_size); -1: no chunking.
  TORCH_ARG(int64_t, chunk) = 2048;
};

class BlockwiseFeedForwardImpl : public torch::nn::Cloneable<BlockwiseFeedForwardImpl> {
 public:
  BlockwiseFeedForwardImpl(int64_t dim, int64_t hidden_dim)
      : BlockwiseFeedForwardImpl(BlockwiseFeedForwardOptions(dim, hidden_dim)) {}
  explicit BlockwiseFeedForwardImpl(const BlockwiseFeedForwardOptions& options_);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x [..., dim] -> [..., dim]
  at::Tensor forward(const at::Tensor& x);

  // LoRA on some of gate_proj, up_proj, down_proj (csrc/nn/lora_linear.h). The op takes
  // plain weights, so with adapters the MLP runs through the layers, unchunked: its
  // [tokens, hidden_dim] activations exist per layer (remat bounds them to one layer).
  void add_lora(const std::vector<std::string>& projections, const LoRAOptions& lora);
  // Folds the adapters into the weights; the chunked op runs again.
  void merge_lora() { adapters_.merge(*this); }

  BlockwiseFeedForwardOptions options;
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};

 private:
  LoRAProjections adapters_;
};

TORCH_MODULE(BlockwiseFeedForward);

}  // namespace bpt::nn
