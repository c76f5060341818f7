#include "csrc/nn/chunked_lm_head_loss.h"

#include <ATen/ops/matmul.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::nn {

ChunkedLMHeadLossImpl::ChunkedLMHeadLossImpl(const ChunkedLMHeadLossOptions& options_) : options(options_) {
  reset();
}

void ChunkedLMHeadLossImpl::reset() {
  TORCH_CHECK(options.dim() > 0 && options.vocab_size() > 0, "ChunkedLMHeadLoss: dim and vocab_size must be positive, "
              "got ", options.dim(), " and ", options.vocab_size());
  ops::check_chunk("ChunkedLMHeadLoss", "chunk", options.chunk());
  weight = register_parameter("weight", at::empty({options.vocab_size(), options.dim()}));
  reset_parameters();
}

void ChunkedLMHeadLossImpl::reset_parameters() {
  at::NoGradGuard no_grad;
  weight.normal_(0.0, 0.02);
}

void ChunkedLMHeadLossImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::ChunkedLMHeadLoss(dim=" << options.dim() << ", vocab_size=" << options.vocab_size()
         << ", chunk=" << options.chunk() << ", z_loss=" << options.z_loss() << ")";
}

LMLoss ChunkedLMHeadLossImpl::forward(const at::Tensor& h, const at::Tensor& targets) {
  auto [loss, n_tokens, n_correct] = ops::chunked_lm_loss(h, weight, targets, options.chunk(), options.ignore_index(),
                                                          options.z_loss(), options.float32_logits());
  return {loss, n_tokens, n_correct};
}

at::Tensor ChunkedLMHeadLossImpl::logits(const at::Tensor& h) const { return at::matmul(h, weight.t()); }

void ChunkedLMHeadLossImpl::tie(const at::Tensor& embedding) {
  TORCH_CHECK(embedding.sizes() == weight.sizes(), "ChunkedLMHeadLoss: tied embedding must be ", weight.sizes(),
              ", got ", embedding.sizes());
  if (parameters_.contains("weight")) parameters_.erase("weight");
  weight = embedding;
}

}  // namespace bpt::nn
