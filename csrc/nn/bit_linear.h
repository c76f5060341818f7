#pragma once
// BitNet b1.58's BitLinear: an RMSNorm of the input (BitNet's SubLN, part of the layer, so
// the activation quantizer sees normalised values), then a linear map whose weights are
// ternary and whose activations are int8 per token.
//
// Training (the default): bpt::bitlinear fake-quantizes both with straight-through
// gradients; `weight` is the full-precision master (fp32, or the model's dtype).
// Inference: quantize() packs the weights 2 bits per value (bpt::ternary_pack) and drops the
// full-precision ones; forward then runs bpt::ternary_linear (int8 x ternary, int32 sums),
// which equals the fake-quantized forward exactly in fp32 (bitlinear multiplies integer levels
// the same way). quantize() drops the weight from parameters(): quantize before handing the
// parameters to an optimizer or FSDP, never after; a quantized layer cannot be clone()d, and
// Module::to(dtype) would convert its uint8 buffer too: build it in its dtype instead.
//
//   names: weight [out, in] (training), norm.weight [in]; after quantize(): the buffers
//   weight_packed [out, ceil(in / 4)] uint8 and weight_scale [] fp32.

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <vector>

#include "csrc/nn/lora_linear.h"
#include "csrc/nn/rms_norm.h"

namespace bpt::nn {

struct BitLinearOptions {
  BitLinearOptions(int64_t in_features, int64_t out_features) : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(double, eps) = 1e-6;  // of the input RMSNorm
  // Built for packed weights (a quantized checkpoint): no full-precision weight is ever
  // allocated; the packed buffers start zero until load_quantized() or a loader fills them.
  TORCH_ARG(bool, quantized) = false;
};

class BitLinearImpl : public torch::nn::Cloneable<BitLinearImpl> {
 public:
  explicit BitLinearImpl(const BitLinearOptions& options_);

  void reset() override;
  // weight ~ N(0, std), norm weight 1.
  void reset_parameters(double std = 0.02);
  void pretty_print(std::ostream& stream) const override;

  // x [..., in] -> [..., out]
  at::Tensor forward(const at::Tensor& x);

  // Packs the weights for inference (no gradients from then on); idempotent. The weights must
  // be finite.
  void quantize();
  // Sets packed weights directly (a quantized checkpoint); checks their shapes.
  void load_quantized(const at::Tensor& packed, const at::Tensor& scale);
  bool quantized() const { return weight_packed.defined(); }

  BitLinearOptions options;
  at::Tensor weight;                       // [out, in]; undefined once quantized
  at::Tensor weight_packed, weight_scale;  // set once quantized
  RMSNorm norm{nullptr};
};

TORCH_MODULE(BitLinear);

// LLaMA's SwiGLU MLP with BitLinear layers: down(silu(gate(x)) * up(x)), each BitLinear
// normalising and quantizing its own input. Submodules named as Hugging Face's. Unlike
// BlockwiseFeedForward it is not chunked over tokens (bLLaMA's remat policies bound its
// activations per layer).
struct BitFeedForwardOptions {
  BitFeedForwardOptions(int64_t dim, int64_t hidden_dim) : dim_(dim), hidden_dim_(hidden_dim) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, hidden_dim);
  TORCH_ARG(double, eps) = 1e-6;
  TORCH_ARG(bool, quantized) = false;  // packed weights (BitLinearOptions::quantized)
};

class BitFeedForwardImpl : public torch::nn::Cloneable<BitFeedForwardImpl> {
 public:
  explicit BitFeedForwardImpl(const BitFeedForwardOptions& options_);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x [..., dim] -> [..., dim]
  at::Tensor forward(const at::Tensor& x);

  // LoRA on some of gate_proj, up_proj, down_proj (csrc/nn/lora_linear.h); BitLinear bases do
  // not merge.
  void add_lora(const std::vector<std::string>& projections, const LoRAOptions& lora);

  BitFeedForwardOptions options;
  BitLinear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};

 private:
  LoRAProjections adapters_;
};

TORCH_MODULE(BitFeedForward);

}  // namespace bpt::nn
