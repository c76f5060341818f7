#pragma once
// LoRA (Hu et al., 2021) around a linear layer: y = base(x) + (alpha / rank) B(A(dropout(x))),
// A [rank, in] ~ Kaiming-uniform (as peft), B [out, rank] = 0, so a fresh adapter changes
// nothing. The base (a torch::nn::Linear or an nn::BitLinear) is frozen: its parameters keep
// requires_grad = false, so they get no gradients and no optimizer state.
//
// Parameter names keep the base's (weight, and norm.weight for a BitLinear) and add peft's
// lora_A.weight and lora_B.weight, so a LLaMA with adapters still loads its Hugging Face
// checkpoint by name and its adapters map onto peft's adapter_model.safetensors.

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

namespace bpt::nn {

struct LoRAOptions {
  TORCH_ARG(int64_t, rank) = 32;
  TORCH_ARG(double, alpha) = 32.0;   // the update is scaled by alpha / rank
  TORCH_ARG(double, dropout) = 0.0;  // on the adapter's input, in training mode
};

class LoRALinearImpl : public torch::nn::Cloneable<LoRALinearImpl> {
 public:
  // `base`: a torch::nn::Linear (no bias) or an nn::BitLinear, with in_features / out_features.
  LoRALinearImpl(torch::nn::AnyModule base, int64_t in_features, int64_t out_features, const LoRAOptions& options);

  void reset() override;
  // A ~ Kaiming-uniform(a = sqrt(5)), B = 0.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // x [..., in] -> [..., out]
  at::Tensor forward(const at::Tensor& x);

  double scaling() const { return options.alpha() / static_cast<double>(options.rank()); }
  // (alpha / rank) B A, [out, in]: what merging adds to a Linear base's weight.
  at::Tensor delta_weight() const;

  torch::nn::AnyModule base;
  int64_t in_features, out_features;
  LoRAOptions options;
  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
};

TORCH_MODULE(LoRALinear);

}  // namespace bpt::nn
