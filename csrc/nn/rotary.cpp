#include "csrc/nn/rotary.h"

#include <ATen/ATen.h>

#include <cmath>

#include "csrc/ops/ops.h"

namespace bpt::nn {

RotaryImpl::RotaryImpl(const RotaryOptions& options_) : options(options_) { reset(); }

void RotaryImpl::reset() {
  const int64_t D = options.head_dim();
  TORCH_CHECK(D > 0 && D % 2 == 0, "Rotary: head_dim must be positive and even, got ", D);
  TORCH_CHECK(options.theta() > 0, "Rotary: theta must be positive, got ", options.theta());
  const at::Tensor exponents = at::arange(0, D, 2, at::kLong).to(at::kFloat) / static_cast<double>(D);
  inv_freq = register_buffer("inv_freq", scaled(1.0 / at::pow(options.theta(), exponents)));
}

at::Tensor RotaryImpl::scaled(const at::Tensor& inv_freq) const {
  const RopeScaling& s = options.scaling();
  if (s.type() == "default") return inv_freq;
  TORCH_CHECK(s.factor() > 0, "Rotary: rope scaling factor must be positive, got ", s.factor());
  if (s.type() == "linear") return inv_freq / s.factor();
  TORCH_CHECK(s.type() == "llama3", "Rotary: rope scaling type must be default, linear or llama3, got '", s.type(),
              "'");
  TORCH_CHECK(s.high_freq_factor() > s.low_freq_factor(), "Rotary: llama3 scaling needs high_freq_factor (",
              s.high_freq_factor(), ") > low_freq_factor (", s.low_freq_factor(), ")");
  // Wavelengths longer than the original context / low_freq_factor are divided by factor,
  // shorter than context / high_freq_factor kept, and the band between interpolated.
  const double context = static_cast<double>(s.original_max_position_embeddings());
  const at::Tensor wavelen = 2 * M_PI / inv_freq;
  const at::Tensor low = at::where(wavelen > context / s.low_freq_factor(), inv_freq / s.factor(), inv_freq);
  const at::Tensor smooth = (context / wavelen - s.low_freq_factor()) / (s.high_freq_factor() - s.low_freq_factor());
  const at::Tensor smoothed = (1 - smooth) * low / s.factor() + smooth * low;
  const at::Tensor medium = (wavelen >= context / s.high_freq_factor()) & (wavelen <= context / s.low_freq_factor());
  return at::where(medium, smoothed, low);
}

void RotaryImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::Rotary(head_dim=" << options.head_dim() << ", theta=" << options.theta();
  if (options.scaling().type() != "default") {
    stream << ", scaling=" << options.scaling().type() << " x" << options.scaling().factor();
  }
  stream << ")";
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
