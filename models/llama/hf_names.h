#pragma once
// The map between bpt's LLaMA parameter names and Hugging Face's. bpt names its modules as
// LlamaForCausalLM does, so the map is the identity on names; what this file adds is the
// list of tensors (and shapes) a Hugging Face checkpoint of a config holds (the tests hold
// the model's named_parameters() to it, which is what the loader walks), and the names a
// loader may skip.
//
//   model.embed_tokens.weight                          [vocab, hidden]
//   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   [heads*head_dim, hidden], [kv_heads*head_dim, hidden] x2,
//                                                      [hidden, heads*head_dim]
//   model.layers.{i}.mlp.{gate,up}_proj.weight         [intermediate, hidden]
//   model.layers.{i}.mlp.down_proj.weight              [hidden, intermediate]
//   (an MoE layer instead: model.layers.{i}.block_sparse_moe.gate.weight [experts, hidden],
//    ...block_sparse_moe.experts.{e}.w1.weight, w3 [intermediate, hidden], w2 [hidden, intermediate])
//   model.layers.{i}.{input,post_attention}_layernorm.weight   [hidden]
//   model.norm.weight                                  [hidden]
//   lm_head.weight                                     [vocab, hidden]  (absent when tied)
//
// bLLaMA (bitlinear): no layer norms; each linear `x` above also has x.norm.weight [in];
// quantized (ternary), x.weight becomes x.weight_packed [out, ceil(in / 4)] uint8 and
// x.weight_scale [] fp32.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "models/llama/config.h"

namespace bpt::models::llama {

// HF tensor name of a bpt parameter name, and back.
std::string hf_name(const std::string& bpt_name);
std::string bpt_name(const std::string& hf_name);

// Every tensor a Hugging Face LlamaForCausalLM checkpoint of `config` holds, with its shape,
// in Hugging Face's order.
std::vector<std::pair<std::string, std::vector<int64_t>>> hf_tensor_shapes(const LlamaConfig& config);

// Tensors that some checkpoints carry and a loader ignores: old rotary inv_freq buffers, and
// lm_head.weight when the embeddings are tied.
bool hf_ignorable(const std::string& hf_name, const LlamaConfig& config);

}  // namespace bpt::models::llama
