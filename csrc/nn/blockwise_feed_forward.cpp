#include "csrc/nn/blockwise_feed_forward.h"

#include <ATen/ATen.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::nn {

BlockwiseFeedForwardImpl::BlockwiseFeedForwardImpl(const BlockwiseFeedForwardOptions& options_)
    : options(options_) {
  reset();
}

void BlockwiseFeedForwardImpl::reset() {
  TORCH_CHECK(options.dim() > 0 && options.hidden_dim() > 0, "BlockwiseFeedForward: dim and hidden_dim must be "
              "positive, got ", options.dim(), " and ", options.hidden_dim());
  ops::check_chunk("BlockwiseFeedForward", "chunk", options.chunk());
  const auto linear = [](int64_t in, int64_t out) { return torch::nn::LinearOptions(in, out).bias(false); };
  gate_proj = register_module("gate_proj", torch::nn::Linear(linear(options.dim(), options.hidden_dim())));
  up_proj = register_module("up_proj", torch::nn::Linear(linear(options.dim(), options.hidden_dim())));
  down_proj = register_module("down_proj", torch::nn::Linear(linear(options.hidden_dim(), options.dim())));
}

void BlockwiseFeedForwardImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::BlockwiseFeedForward(dim=" << options.dim() << ", hidden_dim=" << options.hidden_dim()
         << ", chunk=" << options.chunk() << ")";
}

at::Tensor BlockwiseFeedForwardImpl::forward(const at::Tensor& x) {
  if (adapters_.empty()) {
    return ops::blockwise_ffn(x, gate_proj->weight, up_proj->weight, down_proj->weight, options.chunk());
  }
  const at::Tensor hidden = at::silu(adapters_.run("gate_proj", gate_proj, x)) * adapters_.run("up_proj", up_proj, x);
  return adapters_.run("down_proj", down_proj, hidden);
}

void BlockwiseFeedForwardImpl::add_lora(const std::vector<std::string>& projections, const LoRAOptions& lora) {
  adapters_.add_mlp(*this, projections, torch::nn::AnyModule(gate_proj), torch::nn::AnyModule(up_proj),
                    torch::nn::AnyModule(down_proj), options.dim(), options.hidden_dim(), lora);
}

}  // namespace bpt::nn
