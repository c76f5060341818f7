#pragma once
// The attention core of a transformer block over bpt::blockwise_attention: no parameters,
// the projections and rotary embedding belong to the model's attention layer.

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <optional>

namespace bpt::nn {

struct BlockwiseAttentionOptions {
  TORCH_ARG(bool, causal) = true;
  // Query and key block sizes (llamabpt's q_chunk_size, k_chunk_size); -1: no chunking.
  TORCH_ARG(int64_t, q_chunk) = 256;
  TORCH_ARG(int64_t, k_chunk) = 256;
  // Softmax scale; unset: 1 / sqrt(head_dim).
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;
};

class BlockwiseAttentionImpl : public torch::nn::Cloneable<BlockwiseAttentionImpl> {
 public:
  explicit BlockwiseAttentionImpl(const BlockwiseAttentionOptions& options_ = {});

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // q [B, Hq, T, D], k/v [B, Hkv, S, D], segment_ids [B, S] -> [B, Hq, T, D]. Queries are
  // at key positions kv_offset .. kv_offset + T - 1 (decoding with a KV cache).
  at::Tensor forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& segment_ids = std::nullopt, int64_t kv_offset = 0);

  BlockwiseAttentionOptions options;
};

TORCH_MODULE(BlockwiseAttention);

}  // namespace bpt::nn
