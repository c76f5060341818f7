#include "models/llama/hf_names.h"

#include <fmt/format.h>

namespace bpt::models::llama {

std::string hf_name(const std::string& bpt_name) { return bpt_name; }
std::string bpt_name(const std::string& hf_name) { return hf_name; }

std::vector<std::pair<std::string, std::vector<int64_t>>> hf_tensor_shapes(const LlamaConfig& c) {
  const int64_t C = c.hidden_size, D = c.resolved_head_dim(), I = c.intermediate_size;
  const int64_t q = c.num_attention_heads * D, kv = c.num_key_value_heads * D;
  std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {{"model.embed_tokens.weight", {c.vocab_size, C}}};
  // A linear's tensors: its weight; for bLLaMA also its input norm, and once quantized the
  // packed weight and its scale instead of the weight (models/bllama).
  const auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    if (c.quantization == "ternary") {
      shapes.push_back({name + ".weight_packed", {out, (in + 3) / 4}});
      shapes.push_back({name + ".weight_scale", {}});
    } else {
      shapes.push_back({name + ".weight", {out, in}});
    }
    if (c.bitlinear) shapes.push_back({name + ".norm.weight", {in}});
  };
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string layer = fmt::format("model.layers.{}.", i);
    linear(layer + "self_attn.q_proj", q, C);
    linear(layer + "self_attn.k_proj", kv, C);
    linear(layer + "self_attn.v_proj", kv, C);
    linear(layer + "self_attn.o_proj", C, q);
    if (c.is_moe_layer(i)) {
      // Mixtral's layout: the router, then each expert's w1 (gate), w2 (down), w3 (up).
      shapes.push_back({layer + "block_sparse_moe.gate.weight", {c.num_local_experts, C}});
      for (int64_t e = 0; e < c.num_local_experts; ++e) {
        const std::string expert = fmt::format("{}block_sparse_moe.experts.{}.", layer, e);
        shapes.push_back({expert + "w1.weight", {I, C}});
        shapes.push_back({expert + "w2.weight", {C, I}});
        if (c.expert_activation == "silu") shapes.push_back({expert + "w3.weight", {I, C}});
      }
    } else {
      linear(layer + "mlp.gate_proj", I, C);
      linear(layer + "mlp.up_proj", I, C);
      linear(layer + "mlp.down_proj", C, I);
    }
    if (c.bitlinear) continue;
    shapes.push_back({layer + "input_layernorm.weight", {C}});
    shapes.push_back({layer + "post_attention_layernorm.weight", {C}});
  }
  shapes.push_back({"model.norm.weight", {C}});
  if (!c.tie_word_embeddings) shapes.push_back({"lm_head.weight", {c.vocab_size, C}});
  return shapes;
}

bool hf_ignorable(const std::string& name, const LlamaConfig& config) {
  return name.ends_with("rotary_emb.inv_freq") || (config.tie_word_embeddings && name == "lm_head.weight");
}

}  // namespace bpt::models::llama
