#include "csrc/nn/bit_linear.h"

#include <ATen/ATen.h>

#include "csrc/ops/ops.h"

namespace bpt::nn {

BitLinearImpl::BitLinearImpl(const BitLinearOptions& options_) : options(options_) { reset(); }

void BitLinearImpl::reset() {
  TORCH_CHECK(options.in_features() > 0 && options.out_features() > 0,
              "BitLinear: in_features and out_features must be positive, got ", options.in_features(), " and ",
              options.out_features());
  const int64_t in = options.in_features(), out = options.out_features();
  weight_packed = weight_scale = weight = at::Tensor();
  if (!options.quantized()) weight = register_parameter("weight", at::empty({out, in}));
  norm = register_module("norm", RMSNorm(RMSNormOptions(in).eps(options.eps())));
  if (options.quantized()) load_quantized(at::zeros({out, (in + 3) / 4}, at::kByte), at::ones({}, at::kFloat));
  reset_parameters();
}

void BitLinearImpl::reset_parameters(double std) {
  at::NoGradGuard no_grad;
  if (weight.defined()) weight.normal_(0.0, std);
  norm->reset_parameters();
}

void BitLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::BitLinear(in_features=" << options.in_features() << ", out_features=" << options.out_features()
         << (quantized() ? ", ternary packed" : ", fake-quantized") << ")";
}

at::Tensor BitLinearImpl::forward(const at::Tensor& x) {
  const at::Tensor h = norm(x);
  if (quantized()) return ops::ternary_linear(h, weight_packed, weight_scale, options.in_features());
  return ops::bitlinear(h, weight);
}

void BitLinearImpl::quantize() {
  if (quantized()) return;
  at::NoGradGuard no_grad;
  auto [packed, scale] = ops::ternary_pack(weight);
  load_quantized(packed, scale);
}

void BitLinearImpl::load_quantized(const at::Tensor& packed, const at::Tensor& scale) {
  const int64_t bytes_per_row = (options.in_features() + 3) / 4;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == options.out_features() &&
                  packed.size(1) == bytes_per_row,
              "BitLinear: packed weights must be uint8 [", options.out_features(), ", ", bytes_per_row, "], got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat,
              "BitLinear: the weight scale must be one fp32 value, got ", scale.scalar_type(), " ", scale.sizes());
  weight_packed = register_buffer("weight_packed", packed.contiguous());
  weight_scale = register_buffer("weight_scale", scale.reshape({}).contiguous());
  // The full-precision weights are gone: inference reads only the packed ones.
  weight = at::Tensor();
  if (parameters_.contains("weight")) parameters_.erase("weight");
}

BitFeedForwardImpl::BitFeedForwardImpl(const BitFeedForwardOptions& options_) : options(options_) { reset(); }

void BitFeedForwardImpl::reset() {
  const auto linear = [&](int64_t in, int64_t out) {
    return BitLinear(BitLinearOptions(in, out).eps(options.eps()).quantized(options.quantized()));
  };
  gate_proj = register_module("gate_proj", linear(options.dim(), options.hidden_dim()));
  up_proj = register_module("up_proj", linear(options.dim(), options.hidden_dim()));
  down_proj = register_module("down_proj", linear(options.hidden_dim(), options.dim()));
}

void BitFeedForwardImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::BitFeedForward(dim=" << options.dim() << ", hidden_dim=" << options.hidden_dim() << ")";
}

at::Tensor BitFeedForwardImpl::forward(const at::Tensor& x) {
  const at::Tensor hidden = at::silu(adapters_.run("gate_proj", gate_proj, x)) * adapters_.run("up_proj", up_proj, x);
  return adapters_.run("down_proj", down_proj, hidden);
}

void BitFeedForwardImpl::add_lora(const std::vector<std::string>& projections, const LoRAOptions& lora) {
  adapters_.add_mlp(*this, projections, torch::nn::AnyModule(gate_proj), torch::nn::AnyModule(up_proj),
                    torch::nn::AnyModule(down_proj), options.dim(), options.hidden_dim(), lora);
}

}  // namespace bpt::nn
