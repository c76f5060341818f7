#include "csrc/nn/blockwise_attention.h"

#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::nn {

BlockwiseAttentionImpl::BlockwiseAttentionImpl(const BlockwiseAttentionOptions& options_) : options(options_) {
  reset();
}

void BlockwiseAttentionImpl::reset() {
  ops::check_chunk("BlockwiseAttention", "q_chunk", options.q_chunk());
  ops::check_chunk("BlockwiseAttention", "k_chunk", options.k_chunk());
}

void BlockwiseAttentionImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::BlockwiseAttention(causal=" << options.causal() << ", q_chunk=" << options.q_chunk()
         << ", k_chunk=" << options.k_chunk() << ")";
}

at::Tensor BlockwiseAttentionImpl::forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& segment_ids, int64_t kv_offset) {
  return std::get<0>(ops::blockwise_attention(q, k, v, options.causal(), options.q_chunk(), options.k_chunk(),
                                              segment_ids, options.scale(), kv_offset));
}

}  // namespace bpt::nn
