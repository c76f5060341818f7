#pragma once
// Rotary position embedding (RoPE) over bpt::rotary, laid out as Hugging Face's LLaMA:
// inv_freq[i] = theta^(-2i / head_dim), angle = position * inv_freq, and the angles
// repeated over both halves of the head dimension (rotate_half).

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <utility>

namespace bpt::nn {

// Frequency scaling for contexts past the trained length, as Hugging Face's rope_scaling:
// "default" (none), "linear" (inv_freq / factor) or "llama3" (LLaMA 3.1: low frequencies
// divided by factor, high ones kept, a smooth ramp between).
struct RopeScaling {
  TORCH_ARG(std::string, type) = "default";
  TORCH_ARG(double, factor) = 1.0;
  TORCH_ARG(double, low_freq_factor) = 1.0;
  TORCH_ARG(double, high_freq_factor) = 4.0;
  TORCH_ARG(int64_t, original_max_position_embeddings) = 8192;
};

struct RotaryOptions {
  /* implicit */ RotaryOptions(int64_t head_dim) : head_dim_(head_dim) {}
  // Per-head size D; even.
  TORCH_ARG(int64_t, head_dim);
  // Base of the frequencies (LLaMA 1/2: 10000, LLaMA 3: 500000).
  TORCH_ARG(double, theta) = 10000.0;
  TORCH_ARG(RopeScaling, scaling) = {};
};

class RotaryImpl : public torch::nn::Cloneable<RotaryImpl> {
 public:
  explicit RotaryImpl(const RotaryOptions& options_);

  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // position_ids [B, T] (int) -> (cos, sin), each [B, T, head_dim] in `dtype`; computed in
  // fp32 and then cast, as Hugging Face does. Compute once per step, apply to q and k.
  std::pair<at::Tensor, at::Tensor> cos_sin(const at::Tensor& position_ids, at::ScalarType dtype) const;

  // x [B, H, T, head_dim], position_ids [B, T] -> x rotated, same shape.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& position_ids);

  RotaryOptions options;
  at::Tensor inv_freq;  // [head_dim / 2], fp32 buffer, after scaling

 private:
  // inv_freq under options.scaling().
  at::Tensor scaled(const at::Tensor& inv_freq) const;
};

TORCH_MODULE(Rotary);

}  // namespace bpt::nn
