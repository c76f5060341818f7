#pragma once
// LLaMA as torch::nn modules over the BPT modules, parameter names equal to Hugging Face's
// LlamaForCausalLM (model.layers.{i}.self_attn.q_proj.weight, ...), so state dicts map 1:1.
//
//   input_ids [B, T] -> embed_tokens -> layers x N -> norm -> lm_head: loss (training,
//   chunked, no [T, vocab] logits) or logits (inference)
//   layer: h += o_proj(attention(rotary(q_proj(rms(h))), rotary(k_proj(.)), v_proj(.)))
//          h += mlp(rms(h))                                     (SwiGLU, blockwise)
//
// Packed sequences: segment_ids [B, T] keep attention inside each document and restart the
// position ids at each document's first token. The model knows nothing of parallelism or I/O.
//
// With config.bitlinear (bLLaMA, models/bllama) every projection and MLP linear is an
// nn::BitLinear and the layers have no input_layernorm / post_attention_layernorm.
//
// With config.num_local_experts (GLaM, Mixtral) every moe_layer_freq-th layer's MLP is an
// nn::MoELayer named block_sparse_moe, as in Mixtral's checkpoints; its router losses,
// weighted, join the training loss.
//
// add_lora() freezes the model and puts LoRA adapters (nn::LoRALinear) on the chosen
// projections of every layer, named as peft names them (...q_proj.lora_A.weight).
#include <ATen/core/Tensor.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "csrc/nn/bit_linear.h"
#include "csrc/nn/blockwise_attention.h"
#include "csrc/nn/blockwise_feed_forward.h"
#include "csrc/nn/chunked_lm_head_loss.h"
#include "csrc/nn/lora_linear.h"
#include "csrc/nn/moe.h"
#include "csrc/nn/rms_norm.h"
#include "csrc/nn/rotary.h"
#include "models/llama/config.h"

namespace bpt::models::llama {

// Keys and values of every layer for incremental decoding, preallocated to `capacity` tokens.
struct KVCache {
  std::vector<at::Tensor> keys, values;  // per layer [B, Hkv, capacity, head_dim]
  at::Tensor segment_ids;                // [B, capacity] int64
  int64_t length = 0;                    // tokens cached so far
  bool uses_segments = false;            // segment ids were given: mask by them

  int64_t capacity() const { return segment_ids.size(1); }
};

// LoRA fine-tuning: the adapters' rank, alpha, dropout, and the projections of every layer
// that get one (peft's target_modules).
struct LoRAConfig {
  nn::LoRAOptions options;
  std::vector<std::string> target_modules;
};

// The projections `spec` names: "all", "attention" (q_proj, k_proj, v_proj, o_proj), "mlp"
// (gate_proj, up_proj, down_proj) or a comma-separated list of those names; InputError
// naming `flag` otherwise.
std::vector<std::string> lora_target_modules(const std::string& spec, const std::string& flag);

// What every layer needs besides the hidden state: rotary angles and the document mask.
struct LayerInputs {
  at::Tensor cos, sin;                    // [B, T, head_dim]
  std::optional<at::Tensor> segment_ids;  // [B, S] over the keys (with a cache: all cached keys)
  KVCache* cache = nullptr;               // set when decoding incrementally
};

// A layer's output: the hidden state, and an MoE layer's weighted router losses (a scalar that
// joins the training loss; undefined for a dense layer). As tensors (for checkpointing): [h]
// or [h, router_loss].
struct LayerOutput {
  at::Tensor h, router_loss;
  std::vector<at::Tensor> tensors() const;
  static LayerOutput from(const std::vector<at::Tensor>& tensors);
};

class LlamaAttentionImpl : public torch::nn::Cloneable<LlamaAttentionImpl> {
 public:
  explicit LlamaAttentionImpl(const LlamaConfig& config);
  void reset() override;
  // x [B, T, hidden] -> [B, T, hidden]; `layer` indexes the cache.
  at::Tensor forward(const at::Tensor& x, const LayerInputs& inputs, int64_t layer);
  // Adapters on the named ones of q_proj, k_proj, v_proj, o_proj; merge_lora folds them in.
  void add_lora(const std::vector<std::string>& targets, const nn::LoRAOptions& options);
  void merge_lora();

  LlamaConfig config;
  // torch::nn::Linear, or nn::BitLinear for bLLaMA.
  torch::nn::AnyModule q_proj, k_proj, v_proj, o_proj;
  nn::BlockwiseAttention attention{nullptr};
};
TORCH_MODULE(LlamaAttention);

class LlamaDecoderLayerImpl : public torch::nn::Cloneable<LlamaDecoderLayerImpl> {
 public:
  LlamaDecoderLayerImpl(const LlamaConfig& config, int64_t index);
  void reset() override;
  // h [B, T, hidden] -> [B, T, hidden]: mlp_block(attention_block(h)).
  LayerOutput forward(const at::Tensor& h, const LayerInputs& inputs);
  // h + o_proj(attention(...)): the first residual half of the layer.
  at::Tensor attention_block(const at::Tensor& h, const LayerInputs& inputs);
  // h + mlp(rms(h)): the second half (with an MoE layer, its router losses too).
  LayerOutput mlp_block(const at::Tensor& h);

  LlamaConfig config;
  int64_t index;
  nn::RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};  // null for bLLaMA
  LlamaAttention self_attn{nullptr};
  torch::nn::AnyModule mlp;  // nn::BlockwiseFeedForward, or nn::BitFeedForward for bLLaMA; empty for MoE
  nn::MoELayer block_sparse_moe{nullptr};  // an MoE layer's MLP (config.is_moe_layer(index))
};
TORCH_MODULE(LlamaDecoderLayer);

class LlamaModelImpl : public torch::nn::Cloneable<LlamaModelImpl> {
 public:
  explicit LlamaModelImpl(const LlamaConfig& config);
  void reset() override;
  // input_ids [B, T] -> final hidden states [B, T, hidden], normalised. position_ids default
  // to 0.. per document of segment_ids; with a `cache`, to the cached length + 0.. (one
  // document per cached row: pass position_ids to decode packed documents).
  at::Tensor forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& segment_ids = std::nullopt,
                     const std::optional<at::Tensor>& position_ids = std::nullopt, KVCache* cache = nullptr);

  // How each layer runs; empty: layer.forward. The trainer sets it to apply remat policies
  // (csrc/train), so the model itself knows nothing of them.
  using LayerRunner = std::function<LayerOutput(LlamaDecoderLayerImpl& layer, const at::Tensor& h,
                                                const LayerInputs& inputs)>;
  LayerRunner run_layer;
  // The last forward's weighted router losses, averaged over the MoE layers (undefined without any).
  at::Tensor router_loss;

  LlamaConfig config;
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  nn::RMSNorm norm{nullptr};
  nn::Rotary rotary{nullptr};
};
TORCH_MODULE(LlamaModel);

class LlamaForCausalLMImpl : public torch::nn::Cloneable<LlamaForCausalLMImpl> {
 public:
  // init_weights = false leaves the weights for a loader to fill (faster for large models).
  explicit LlamaForCausalLMImpl(const LlamaConfig& config, bool init_weights = true);
  void reset() override;
  // Hugging Face's initialisation: linear and embedding weights ~ N(0, initializer_range),
  // norm weights 1.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // Training: targets [B, T] (ignore_index -100 where no loss) -> mean loss over counted
  // tokens (plus the MoE layers' weighted router losses), without [B, T, vocab] logits.
  nn::LMLoss forward(const at::Tensor& input_ids, const at::Tensor& targets,
                     const std::optional<at::Tensor>& segment_ids = std::nullopt,
                     const std::optional<at::Tensor>& position_ids = std::nullopt);
  // Inference: logits [B, T, vocab] (fp32 when float32_logits), or of the last position
  // only ([B, 1, vocab]) when `last_only`.
  at::Tensor logits(const at::Tensor& input_ids, const std::optional<at::Tensor>& segment_ids = std::nullopt,
                    const std::optional<at::Tensor>& position_ids = std::nullopt, KVCache* cache = nullptr,
                    bool last_only = false);

  // An empty cache for `batch` sequences of up to `capacity` tokens, in the model's dtype.
  KVCache make_cache(int64_t batch, int64_t capacity) const;

  // bLLaMA: packs every BitLinear's weights 2 bits per value (inference only from then on:
  // the full-precision weights are dropped) and sets config.quantization to "ternary".
  void quantize_bitlinear();
  // The MoE layers' router statistics from the last forward, averaged over the layers
  // (zeros without MoE layers).
  nn::RouterStats router_stats() const;

  // The BitLinear layers still in full precision (0 for a LLaMA or a quantized bLLaMA).
  int64_t unquantized_bitlinear_layers() const;

  // Freezes every parameter (requires_grad false) and adds LoRA adapters to the target
  // projections of every layer; B starts at zero, so the model computes what it did.
  void add_lora(const LoRAConfig& lora_config);
  // Adds every adapter's update into its weight and removes the adapters, leaving a plain
  // LLaMA (frozen still). A bLLaMA's BitLinear weights cannot absorb them: refused.
  void merge_lora();

  LlamaConfig config;
  std::optional<LoRAConfig> lora;  // set while the model has adapters
  bool init_weights;
  LlamaModel model{nullptr};
  nn::ChunkedLMHeadLoss lm_head{nullptr};
};
TORCH_MODULE(LlamaForCausalLM);

// Position ids that restart at 0 where segment_ids [B, T] changes value.
at::Tensor positions_from_segments(const at::Tensor& segment_ids);

}  // namespace bpt::models::llama
