#include "csrc/nn/rotary.h"

#include <ATen/ATen.h>

#include "csrc/ops/ops.h"

namespace bpt::nn {

RotaryImpl::RotaryImpl(const RotaryOptions& options_) : options(options_) { reset(); }

void RotaryImpl::reset() {
  const int64_t D = options.head_dim();
  TORCH_CHECK(D > 0 && D % 2 == 0, "Rotary: head_dim must be positive and even, got ", D);
  TORCH_CHECK(options.theta() > 0, "Rotary: theta must be positive, got ", options.theta());
  const at::Tensor exponents = at::arange(0, D, 2, at::kLong).to(at::kFloat) / static_cast<double>(D);
  inv_freq = register_buffer("inv_freq", 1.0 / at::pow(options.theta(), exponents));
}

void RotaryImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::Rotary(head_dim=" << options.head_dim() << ", theta=" << options.theta() << ")";
}

std::pair<at::Tensor, at::Tensor> RotaryImpl::cos_sin(const at::Tensor& position_ids, at::ScalarType dtype) const {
  TORCH_CHECK(position_ids.dim() == 2, "Rotary: position_ids must be [B, T], got shape ", position_ids.sizes());
  TORCH_CHECK(!at::isFloatingType(position_ids.scalar_type()), "Rotary: position_ids must be integer, got ",
              position_ids.scalar_type());
  const at::Tensor angles = position_ids.to(inv_freq.device(), at::kFloat).unsqueeze(-1) * inv_freq;  // [B, T, D/2]
  const at::Tensor emb = at::cat({angles, angles}, -1);                                                // [B, T, D]
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

at::Tensor RotaryImpl::forward(const at::Tensor& x, const at::Tensor& position_ids) {
  auto [cos, sin] = cos_sin(position_ids, x.scalar_type());
  return ops::rotary(x, cos, sin);
}

}  // namespace bpt::nn
