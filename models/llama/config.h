#pragma once
// LLaMA's configuration: the architecture (Hugging Face's LlamaConfig field names), the BPT
// chunk sizes and numerics (llamabpt's --llama.* flag names), and named presets.
//
// Read from and written to a Hugging Face config.json (bpt-only fields sit under "bpt", which
// transformers ignores); every field can be overridden by name from a string, which is how
// `--llama.<field>=value` and `--update_llama_config` reach it.
#include <c10/core/ScalarType.h>
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "csrc/nn/rotary.h"

namespace bpt::models::llama {

struct LlamaConfig {
  // Architecture, as Hugging Face names it.
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;  // < num_attention_heads: grouped-query attention
  int64_t head_dim = 0;              // 0: hidden_size / num_attention_heads
  int64_t max_sequence_length = 2048;  // HF's max_position_embeddings
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  nn::RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  double initializer_range = 0.02;
  int64_t bos_token_id = 1;
  std::vector<int64_t> eos_token_ids = {2};  // HF's eos_token_id: one id or a list
  std::optional<int64_t> pad_token_id;

  // Blockwise parallel transformer: tokens per block; -1 disables chunking.
  int64_t q_chunk_size = 256;
  int64_t k_chunk_size = 256;
  int64_t ffn_chunk_size = 2048;
  int64_t loss_chunk_size = 1024;  // the fused LM head + loss chunk
  int64_t head_chunk_size = -1;    // accepted for llamabpt; bpt fuses head and loss (loss_chunk_size)
  bool float32_logits = true;      // softmax and loss over fp32 logits in bf16/fp16 models
  std::string remat_policy = "nothing_saveable";
  bool scan_layers = false;  // accepted for llamabpt; layers are a loop in C++
  // Parameter and compute dtype: float32, bfloat16 or float16.
  c10::ScalarType dtype = c10::ScalarType::Float;

  // bLLaMA (BitNet b1.58, models/bllama): every linear of attention and MLP is a BitLinear
  // (ternary weights, int8 activations, an RMSNorm of its own input); the layers then have no
  // input_layernorm / post_attention_layernorm, which BitLinear's own norms replace.
  bool bitlinear = false;
  // "none", or "ternary": the BitLinear weights are packed 2 bits per value (inference only).
  std::string quantization = "none";

  // Mixture of experts (GLaM, Mixtral; csrc/nn/moe.h): with num_local_experts > 0 the MLP of
  // every moe_layer_freq-th layer (layers freq - 1, 2 freq - 1, ...) is an MoE layer of that
  // many experts of intermediate_size, top num_experts_per_tok routing. capacity_factor 0 is
  // dropless (Mixtral); GLaM's presets use 2.0. The router losses are added to the training
  // loss with these weights, averaged over the MoE layers.
  int64_t num_local_experts = 0;
  int64_t num_experts_per_tok = 2;
  int64_t moe_layer_freq = 1;
  double capacity_factor = 0, eval_capacity_factor = 0;
  double router_aux_loss_coef = 0.001;  // Mixtral's default (GLaM: 0.01)
  double router_z_loss_coef = 0;        // GLaM presets: 1e-4
  std::string expert_activation = "silu";  // silu: SwiGLU experts (w1, w2, w3); gelu: w1, w2

  int64_t resolved_head_dim() const { return head_dim > 0 ? head_dim : hidden_size / num_attention_heads; }
  bool is_moe_layer(int64_t layer) const {
    return num_local_experts > 0 && layer % moe_layer_freq == moe_layer_freq - 1;
  }

  // Throws InputError naming the first inconsistent field.
  void validate() const;
  // Sets field `name` from its text form ("512", "true", "bfloat16", "2" or "[2, 3]" for
  // eos_token_ids, "llama3" for rope_scaling.type); throws InputError naming an unknown
  // field (and the nearest known one) or a value that does not parse.
  void set(const std::string& name, const std::string& value);
  // Every settable field and its current value as text, in declaration order.
  std::vector<std::pair<std::string, std::string>> fields() const;

  // Applies "field=value,field=value" (llamabpt's --update_llama_config).
  void update(const std::string& assignments);
};

// Named presets: "tiny" (tests), llamabpt's "1b", "3b", "7b", "13b", "30b", "65b",
// "llama2-7b", "llama2-13b", "llama2-70b" (GQA) and "llama3-8b"; bLLaMA's "bllama-1.7b" (the
// seed's default size) and "bllama-tiny"; GLaM's "glam-126m-64e", "glam-64b-64e" (Pax's two) and
// "glam-tiny". Throws InputError otherwise.
LlamaConfig preset(const std::string& name);
// Turns `config` into a GLaM: 64 GELU experts in every other layer, top-2, capacity factor 2
// in training (dropless inference), aux loss 0.01 and z-loss 1e-4 (bpt-train --model glam); a
// config with experts keeps its own.
void make_glam(LlamaConfig& config);
std::vector<std::string> preset_names();

// config.json as Hugging Face writes it (either transformers 4's rope_theta/rope_scaling or
// 5's rope_parameters), `where` naming the file in errors.
LlamaConfig from_hf_json(const nlohmann::json& json, const std::string& where);
// The Hugging Face config.json of `config`, with bpt's fields under "bpt".
nlohmann::json to_hf_json(const LlamaConfig& config);

// "float32" / "fp32" / "bf16" / ... -> dtype; throws InputError naming `field`.
c10::ScalarType parse_dtype(const std::string& text, const std::string& field);
// at::kFloat -> "float32", as Hugging Face's torch_dtype.
std::string dtype_string(c10::ScalarType dtype);

}  // namespace bpt::models::llama
