#include "csrc/nn/lora_linear.h"

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <cmath>

namespace bpt::nn {

LoRALinearImpl::LoRALinearImpl(torch::nn::AnyModule base_, int64_t in_features_, int64_t out_features_,
                               const LoRAOptions& options_)
    : base(std::move(base_)), in_features(in_features_), out_features(out_features_), options(options_) {
  reset();
}

void LoRALinearImpl::reset() {
  TORCH_CHECK(!base.is_empty(), "LoRALinear: no base layer");
  TORCH_CHECK(options.rank() > 0, "LoRALinear: rank must be positive, got ", options.rank());
  TORCH_CHECK(options.dropout() >= 0 && options.dropout() < 1, "LoRALinear: dropout must be in [0, 1), got ",
              options.dropout());
  // The base's own tensors and submodules, under their own names, frozen.
  const auto base_module = base.ptr();
  for (auto& item : base_module->named_parameters(/*recurse=*/false)) {
    item.value().requires_grad_(false);
    register_parameter(item.key(), item.value(), /*requires_grad=*/false);
  }
  for (auto& item : base_module->named_buffers(/*recurse=*/false)) register_buffer(item.key(), item.value());
  for (auto& item : base_module->named_children()) {
    for (auto& parameter : item.value()->parameters()) parameter.requires_grad_(false);
    register_module(item.key(), item.value());
  }
  // In the base's dtype, so a bf16 model gets bf16 adapters (AdamW keeps fp32 masters).
  const auto params = base_module->parameters();
  const at::ScalarType dtype = params.empty() ? at::kFloat : params.front().scalar_type();
  const auto linear = [dtype](int64_t in, int64_t out) {
    torch::nn::Linear layer(torch::nn::LinearOptions(in, out).bias(false));
    layer->to(dtype);
    return layer;
  };
  lora_A = register_module("lora_A", linear(in_features, options.rank()));
  lora_B = register_module("lora_B", linear(options.rank(), out_features));
  reset_parameters();
}

void LoRALinearImpl::reset_parameters() {
  at::NoGradGuard no_grad;
  torch::nn::init::kaiming_uniform_(lora_A->weight, std::sqrt(5.0));
  lora_B->weight.zero_();
}

void LoRALinearImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::LoRALinear(in_features=" << in_features << ", out_features=" << out_features
         << ", rank=" << options.rank() << ", alpha=" << options.alpha() << ")";
}

at::Tensor LoRALinearImpl::forward(const at::Tensor& x) {
  const at::Tensor h = options.dropout() > 0 ? at::dropout(x, options.dropout(), is_training()) : x;
  return base.forward<at::Tensor>(x) + lora_B(lora_A(h)) * scaling();
}

at::Tensor LoRALinearImpl::delta_weight() const {
  return at::mm(lora_B->weight.to(at::kFloat), lora_A->weight.to(at::kFloat)) * scaling();
}

torch::nn::AnyModule LoRALinearImpl::merge() {
  auto* linear = base.ptr()->as<torch::nn::Linear>();
  TORCH_CHECK(linear != nullptr, "LoRALinear::merge: only a Linear base merges (a BitLinear's ternary weights cannot "
              "absorb the update); keep the adapter beside it");
  at::NoGradGuard no_grad;
  // In fp32, as peft merges, so a bf16 model rounds once (the sum), not three times.
  linear->weight.copy_(linear->weight.to(at::kFloat) + delta_weight());
  return base;
}

void add_lora(torch::nn::Module& owner, const std::string& name, torch::nn::AnyModule& slot, int64_t in_features,
              int64_t out_features, const LoRAOptions& options) {
  TORCH_CHECK(slot.ptr()->as<LoRALinear>() == nullptr, "add_lora: ", name, " already has an adapter");
  LoRALinear adapted(slot, in_features, out_features, options);
  owner.replace_module(name, adapted.ptr());
  slot = torch::nn::AnyModule(adapted);
}

void merge_lora(torch::nn::Module& owner, const std::string& name, torch::nn::AnyModule& slot) {
  auto* adapted = slot.ptr()->as<LoRALinear>();
  if (adapted == nullptr) return;
  slot = adapted->merge();
  owner.replace_module(name, slot.ptr());
}

void LoRAProjections::add(torch::nn::Module& owner, const std::string& name, torch::nn::AnyModule layer,
                          int64_t in_features, int64_t out_features, const LoRAOptions& options) {
  add_lora(owner, name, layer, in_features, out_features, options);
  slots_[name] = std::move(layer);
}

void LoRAProjections::add_mlp(torch::nn::Module& owner, const std::vector<std::string>& projections,
                              torch::nn::AnyModule gate_proj, torch::nn::AnyModule up_proj,
                              torch::nn::AnyModule down_proj, int64_t dim, int64_t hidden_dim,
                              const LoRAOptions& options) {
  for (const std::string& name : projections) {
    if (name == "gate_proj") {
      add(owner, name, gate_proj, dim, hidden_dim, options);
    } else if (name == "up_proj") {
      add(owner, name, up_proj, dim, hidden_dim, options);
    } else if (name == "down_proj") {
      add(owner, name, down_proj, hidden_dim, dim, options);
    } else {
      TORCH_CHECK(false, "LoRA: an MLP has no projection '", name, "' (gate_proj, up_proj, down_proj)");
    }
  }
}

void LoRAProjections::merge(torch::nn::Module& owner) {
  for (auto& [name, slot] : slots_) merge_lora(owner, name, slot);
  slots_.clear();
}

}  // namespace bpt::nn
