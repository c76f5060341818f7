#pragma once
// LoRA adapters in peft's directory layout, so `PeftModel.from_pretrained(base, dir)` loads
// what bpt trains, and bpt loads what peft saves:
//
//   adapter_config.json          {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 32,
//                                 "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": [...],
//                                 "base_model_name_or_path": "...", "bias": "none", ...}
//   adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
//                                [r, in] and ...lora_B.weight [out, r], one pair per adapted
//                                projection (bpt's parameter name behind peft's prefix)
//
// A bpt LoRA training checkpoint is such a directory (plus bpt's trainer and optimizer state),
// and every app that reads a model (bpt-generate, bpt-eval, bpt-convert, bpt.llama.Llama) takes
// one: load_llama_model() reads the base named in adapter_config.json and puts the adapter on.
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "csrc/io/safetensors.h"
#include "models/llama/config.h"
#include "models/llama/llama.h"

namespace bpt::io {

struct AdapterConfig {
  models::llama::LoRAConfig lora;
  std::string base_model;  // base_model_name_or_path: the directory of the weights adapted
};

// Whether `dir` holds an adapter (an adapter_config.json).
bool is_lora_adapter(const std::string& dir);

// dir/adapter_config.json; InputError naming the file and field for what is malformed or for
// peft options bpt does not implement (DoRA, rsLoRA, biases, per-layer ranks, ...).
AdapterConfig read_adapter_config(const std::string& dir);
// The adapter's base_model_name_or_path, which must be a directory (bpt reads the base from
// disk: a moved base or a Hub id is an InputError naming dir/adapter_config.json).
std::string adapter_base(const std::string& dir);
// InputError naming `dir` and the field if the adapter `saved` differs from `current` (a run
// resumed with other --finetune.* settings than it was started with).
void check_same_adapters(const AdapterConfig& saved, const models::llama::LoRAConfig& current, const std::string& dir);
// The tokenizer a model directory comes with: dir/tokenizer.model, or its base's for an
// adapter directory without one.
std::string default_tokenizer(const std::string& dir);

// The adapter parameters of `model` (lora_A / lora_B), under bpt's names.
NamedTensors adapter_tensors(const models::llama::LlamaForCausalLMImpl& model);
// Writes adapter_config.json and adapter_model.safetensors (`tensors`, by bpt name as
// adapter_tensors gives them, stored under peft's names) into the existing directory `dir`.
void write_adapter(const AdapterConfig& config, const NamedTensors& tensors, const std::string& dir);
// Hands each tensor of dir/adapter_model.safetensors to `use` (bpt name, whole tensor), after
// checking it against `shapes` (bpt names; only the lora_A / lora_B ones are expected): a
// missing, extra or misshapen tensor is an InputError naming the file.
void read_adapter_weights(const std::string& dir, const std::map<std::string, std::vector<int64_t>>& shapes,
                          const std::function<void(const std::string&, const at::Tensor&)>& use);
// read_adapter_weights into `model`'s own adapters.
void load_adapter_weights(models::llama::LlamaForCausalLMImpl& model, const std::string& dir);

// A model for inference from `dir`: a checkpoint in any layout (hf_checkpoint.h,
// sharded_checkpoint.h), or an adapter directory, whose base is read and adapted. `configure`
// may change the config (dtype, chunk sizes) before the model is built. In eval mode.
models::llama::LlamaForCausalLM load_llama_model(
    const std::string& dir, const std::function<void(models::llama::LlamaConfig&)>& configure = {});

}  // namespace bpt::io
