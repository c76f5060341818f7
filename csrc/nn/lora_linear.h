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

#include <map>
#include <string>
#include <vector>

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
  // (alpha / rank) B A, [out, in], in fp32: what merging adds to a Linear base's weight.
  at::Tensor delta_weight() const;
  // Adds delta_weight() into the base's weight and returns the base, which then computes what
  // this layer did (up to rounding). Only a Linear base merges: a BitLinear quantizes its
  // weight, and the ternary levels of W + delta are not those of W plus an update.
  torch::nn::AnyModule merge();

  torch::nn::AnyModule base;
  int64_t in_features, out_features;
  LoRAOptions options;
  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
};

TORCH_MODULE(LoRALinear);

// Adapters in a module that holds its projections in AnyModule slots (LLaMA's attention):
// wraps the layer in `slot`, registered in `owner` as `name`, in a LoRALinear registered
// under the same name, so the parameter names become <name>.weight, <name>.lora_A.weight, ...
void add_lora(torch::nn::Module& owner, const std::string& name, torch::nn::AnyModule& slot, int64_t in_features,
              int64_t out_features, const LoRAOptions& options);
// If `slot` holds a LoRALinear, merges it (LoRALinearImpl::merge) and puts the base back.
void merge_lora(torch::nn::Module& owner, const std::string& name, torch::nn::AnyModule& slot);

// Adapters on a module's typed projections (an MLP's gate_proj, up_proj, down_proj): each
// adapted projection is registered in the owner as a LoRALinear in its place, and the owner's
// forward calls run(name, layer, x), which uses the adapter where there is one.
class LoRAProjections {
 public:
  void add(torch::nn::Module& owner, const std::string& name, torch::nn::AnyModule layer, int64_t in_features,
           int64_t out_features, const LoRAOptions& options);
  // Adapters on the named ones of a SwiGLU MLP's gate_proj and up_proj (dim -> hidden_dim) and
  // down_proj (hidden_dim -> dim).
  void add_mlp(torch::nn::Module& owner, const std::vector<std::string>& projections, torch::nn::AnyModule gate_proj,
               torch::nn::AnyModule up_proj, torch::nn::AnyModule down_proj, int64_t dim, int64_t hidden_dim,
               const LoRAOptions& options);
  // Merges every adapter into its Linear (LoRALinearImpl::merge) and registers the Linears again.
  void merge(torch::nn::Module& owner);
  bool empty() const { return slots_.empty(); }

  template <typename Layer>
  at::Tensor run(const std::string& name, Layer& layer, const at::Tensor& x) {
    const auto it = slots_.find(name);
    return it == slots_.end() ? layer(x) : it->second.forward<at::Tensor>(x);
  }

 private:
  std::map<std::string, torch::nn::AnyModule> slots_;
};

}  // namespace bpt::nn
