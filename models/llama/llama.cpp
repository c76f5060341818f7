#include "models/llama/llama.h"

#include <ATen/ATen.h>
#include <c10/core/DefaultDtype.h>

#include "csrc/common/error.h"
#include "csrc/common/text.h"
#include "csrc/ops/ops.h"

namespace bpt::models::llama {
namespace {

// A projection without bias: torch::nn::Linear, or BitLinear in a bLLaMA.
torch::nn::AnyModule projection(const LlamaConfig& config, int64_t in, int64_t out) {
  if (config.bitlinear) {
    return torch::nn::AnyModule(nn::BitLinear(
        nn::BitLinearOptions(in, out).eps(config.rms_norm_eps).quantized(config.quantization == "ternary")));
  }
  return torch::nn::AnyModule(torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)));
}

at::Tensor run(torch::nn::AnyModule& module, const at::Tensor& x) { return module.forward<at::Tensor>(x); }

const std::vector<std::string> kAttentionProjections = {"q_proj", "k_proj", "v_proj", "o_proj"};
const std::vector<std::string> kMlpProjections = {"gate_proj", "up_proj", "down_proj"};

}  // namespace

std::vector<std::string> lora_target_modules(const std::string& spec, const std::string& flag) {
  if (spec == "attention") return kAttentionProjections;
  if (spec == "mlp") return kMlpProjections;
  std::vector<std::string> all = kAttentionProjections;
  all.insert(all.end(), kMlpProjections.begin(), kMlpProjections.end());
  if (spec == "all") return all;
  const char* expected = "expected all, attention, mlp or a comma-separated list of q_proj, k_proj, v_proj, o_proj, "
                         "gate_proj, up_proj, down_proj";
  std::vector<std::string> names = split(spec, ',');
  if (names.empty()) throw_input_error("{}: {}", flag, expected);
  for (auto it = names.begin(); it != names.end(); ++it) {
    if (std::find(all.begin(), all.end(), *it) == all.end()) {
      throw_input_error("{}: '{}' is not a LLaMA projection; {}", flag, *it, expected);
    }
    if (std::find(names.begin(), it, *it) != it) throw_input_error("{}: '{}' is named twice", flag, *it);
  }
  return names;
}

at::Tensor positions_from_segments(const at::Tensor& segment_ids) {
  const int64_t B = segment_ids.size(0), T = segment_ids.size(1);
  const at::Tensor index = at::arange(T, segment_ids.options().dtype(at::kLong)).expand({B, T});
  at::Tensor is_start = at::ones({B, T}, segment_ids.options().dtype(at::kBool));
  if (T > 1) is_start.narrow(1, 1, T - 1).copy_(segment_ids.narrow(1, 1, T - 1) != segment_ids.narrow(1, 0, T - 1));
  const at::Tensor start = std::get<0>(at::where(is_start, index, at::zeros_like(index)).cummax(1));
  return index - start;
}

// ---- attention

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& config_) : config(config_) { reset(); }

namespace {

// The attention's projections with their names and sizes, in Hugging Face's order.
struct Projection {
  std::string name;
  torch::nn::AnyModule* slot;
  int64_t in, out;
};

std::vector<Projection> projections(LlamaAttentionImpl& attention) {
  const LlamaConfig& c = attention.config;
  const int64_t C = c.hidden_size, D = c.resolved_head_dim(), H = c.num_attention_heads, Hkv = c.num_key_value_heads;
  return {{"q_proj", &attention.q_proj, C, H * D},
          {"k_proj", &attention.k_proj, C, Hkv * D},
          {"v_proj", &attention.v_proj, C, Hkv * D},
          {"o_proj", &attention.o_proj, H * D, C}};
}

}  // namespace

void LlamaAttentionImpl::reset() {
  for (const Projection& p : projections(*this)) {
    *p.slot = projection(config, p.in, p.out);
    register_module(p.name, p.slot->ptr());
  }
  attention = register_module("attention", nn::BlockwiseAttention(nn::BlockwiseAttentionOptions()
                                                                       .causal(true)
                                                                       .q_chunk(config.q_chunk_size)
                                                                       .k_chunk(config.k_chunk_size)));
}

at::Tensor LlamaAttentionImpl::forward(const at::Tensor& x, const LayerInputs& inputs, int64_t layer) {
  const int64_t B = x.size(0), T = x.size(1), D = config.resolved_head_dim();
  const int64_t H = config.num_attention_heads, Hkv = config.num_key_value_heads;
  const at::Tensor q = ops::rotary(run(q_proj, x).view({B, T, H, D}).transpose(1, 2), inputs.cos, inputs.sin);
  at::Tensor k = ops::rotary(run(k_proj, x).view({B, T, Hkv, D}).transpose(1, 2), inputs.cos, inputs.sin);
  at::Tensor v = run(v_proj, x).view({B, T, Hkv, D}).transpose(1, 2);
  int64_t kv_offset = 0;
  if (KVCache* cache = inputs.cache) {
    // Append this step's keys and values; attend over everything cached so far.
    kv_offset = cache->length;
    cache->keys[layer].narrow(2, kv_offset, T).copy_(k);
    cache->values[layer].narrow(2, kv_offset, T).copy_(v);
    k = cache->keys[layer].narrow(2, 0, kv_offset + T);
    v = cache->values[layer].narrow(2, 0, kv_offset + T);
  }
  const at::Tensor out = attention(q, k, v, inputs.segment_ids, kv_offset);  // [B, H, T, D]
  return run(o_proj, out.transpose(1, 2).reshape({B, T, H * D}));
}

void LlamaAttentionImpl::add_lora(const std::vector<std::string>& targets, const nn::LoRAOptions& options) {
  for (const Projection& p : projections(*this)) {
    if (std::find(targets.begin(), targets.end(), p.name) != targets.end()) {
      nn::add_lora(*this, p.name, *p.slot, p.in, p.out, options);
    }
  }
}

void LlamaAttentionImpl::merge_lora() {
  for (const Projection& p : projections(*this)) nn::merge_lora(*this, p.name, *p.slot);
}

// ---- decoder layer

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& config_, int64_t index_)
    : config(config_), index(index_) {
  reset();
}

std::vector<at::Tensor> LayerOutput::tensors() const {
  return router_loss.defined() ? std::vector<at::Tensor>{h, router_loss} : std::vector<at::Tensor>{h};
}

LayerOutput LayerOutput::from(const std::vector<at::Tensor>& tensors) {
  return {tensors.at(0), tensors.size() > 1 ? tensors[1] : at::Tensor()};
}

void LlamaDecoderLayerImpl::reset() {
  // Registered in Hugging Face's order, so parameters() lists them as its named_parameters().
  const int64_t C = config.hidden_size;
  self_attn = register_module("self_attn", LlamaAttention(config));
  if (config.is_moe_layer(index)) {
    block_sparse_moe = register_module(
        "block_sparse_moe", nn::MoELayer(nn::MoEOptions(C, config.intermediate_size, config.num_local_experts)
                                             .top_k(config.num_experts_per_tok)
                                             .capacity_factor(config.capacity_factor)
                                             .eval_capacity_factor(config.eval_capacity_factor)
                                             .activation(config.expert_activation)
                                             .chunk(config.ffn_chunk_size)));
  } else if (config.bitlinear) {
    mlp = torch::nn::AnyModule(nn::BitFeedForward(nn::BitFeedForwardOptions(C, config.intermediate_size)
                                                      .eps(config.rms_norm_eps)
                                                      .quantized(config.quantization == "ternary")));
  } else {
    mlp = torch::nn::AnyModule(nn::BlockwiseFeedForward(
        nn::BlockwiseFeedForwardOptions(C, config.intermediate_size).chunk(config.ffn_chunk_size)));
  }
  if (!mlp.is_empty()) register_module("mlp", mlp.ptr());
  if (config.bitlinear) return;  // each BitLinear normalises its own input
  input_layernorm = register_module("input_layernorm", nn::RMSNorm(nn::RMSNormOptions(C).eps(config.rms_norm_eps)));
  post_attention_layernorm =
      register_module("post_attention_layernorm", nn::RMSNorm(nn::RMSNormOptions(C).eps(config.rms_norm_eps)));
}

LayerOutput LlamaDecoderLayerImpl::forward(const at::Tensor& h, const LayerInputs& inputs) {
  return mlp_block(attention_block(h, inputs));
}

at::Tensor LlamaDecoderLayerImpl::attention_block(const at::Tensor& h, const LayerInputs& inputs) {
  return h + self_attn(input_layernorm ? input_layernorm(h) : h, inputs, index);
}

LayerOutput LlamaDecoderLayerImpl::mlp_block(const at::Tensor& h) {
  const at::Tensor x = post_attention_layernorm ? post_attention_layernorm(h) : h;
  if (!block_sparse_moe) return {h + run(mlp, x), at::Tensor()};
  auto [out, routing] = block_sparse_moe(x);
  return {h + out, routing.aux_loss * config.router_aux_loss_coef + routing.z_loss * config.router_z_loss_coef};
}

// ---- model

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& config_) : config(config_) { reset(); }

void LlamaModelImpl::reset() {
  config.validate();
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(config.vocab_size, config.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) layers->push_back(LlamaDecoderLayer(config, i));
  norm = register_module("norm", nn::RMSNorm(nn::RMSNormOptions(config.hidden_size).eps(config.rms_norm_eps)));
  rotary = register_module("rotary", nn::Rotary(nn::RotaryOptions(config.resolved_head_dim())
                                                    .theta(config.rope_theta)
                                                    .scaling(config.rope_scaling)));
}

at::Tensor LlamaModelImpl::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& segment_ids,
                                   const std::optional<at::Tensor>& position_ids, KVCache* cache) {
  TORCH_CHECK(input_ids.dim() == 2 && !at::isFloatingType(input_ids.scalar_type()),
              "LlamaModel: input_ids must be integer [B, T], got ", input_ids.scalar_type(), " ", input_ids.sizes());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  TORCH_CHECK(T > 0, "LlamaModel: input_ids is empty");
  const auto [min_id, max_id] = at::aminmax(input_ids);
  TORCH_CHECK(min_id.item<int64_t>() >= 0 && max_id.item<int64_t>() < config.vocab_size, "LlamaModel: token ids [",
              min_id.item<int64_t>(), ", ", max_id.item<int64_t>(), "] outside the vocabulary [0, ", config.vocab_size,
              ")");
  for (const auto* ids : {&segment_ids, &position_ids}) {
    TORCH_CHECK(!ids->has_value() || (*ids)->sizes() == input_ids.sizes(), "LlamaModel: segment_ids and position_ids "
                "must be [B, T] = ", input_ids.sizes(), ", got ", (*ids)->sizes());
  }

  LayerInputs inputs;
  inputs.cache = cache;
  at::Tensor positions;
  if (cache != nullptr) {
    const int64_t offset = cache->length;
    TORCH_CHECK(cache->keys.size() == layers->size() && cache->segment_ids.size(0) == B,
                "LlamaModel: the cache was made for another model or batch size");
    TORCH_CHECK(offset + T <= cache->capacity(), "LlamaModel: ", offset, " cached + ", T, " new tokens exceed the "
                "cache's capacity of ", cache->capacity());
    if (segment_ids) cache->segment_ids.narrow(1, offset, T).copy_(*segment_ids);
    if (segment_ids || cache->uses_segments) {
      cache->uses_segments = true;
      inputs.segment_ids = cache->segment_ids.narrow(1, 0, offset + T);
    }
    positions = position_ids ? *position_ids
                             : at::arange(offset, offset + T, input_ids.options().dtype(at::kLong)).expand({B, T});
  } else {
    inputs.segment_ids = segment_ids;
    positions = position_ids ? *position_ids
                : segment_ids ? positions_from_segments(*segment_ids)
                              : at::arange(T, input_ids.options().dtype(at::kLong)).expand({B, T});
  }

  at::Tensor h = embed_tokens(input_ids);
  std::tie(inputs.cos, inputs.sin) = rotary->cos_sin(positions, h.scalar_type());
  router_loss = at::Tensor();
  int64_t moe_layers = 0;
  for (const auto& module : *layers) {
    LlamaDecoderLayerImpl& layer = *module->as<LlamaDecoderLayer>();
    const LayerOutput out = run_layer ? run_layer(layer, h, inputs) : layer.forward(h, inputs);
    h = out.h;
    if (!out.router_loss.defined()) continue;
    router_loss = router_loss.defined() ? router_loss + out.router_loss : out.router_loss;
    ++moe_layers;
  }
  // The mean over MoE layers, so a coefficient means the same at any depth (transformers'
  // Mixtral pools the layers' statistics into one term, of the same size).
  if (moe_layers > 1) router_loss = router_loss / static_cast<double>(moe_layers);
  if (cache != nullptr) cache->length += T;
  return norm(h);
}

// ---- causal LM

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& config_, bool init_weights_)
    : config(config_), init_weights(init_weights_) {
  reset();
}

namespace {

// Parameters are created in the model's dtype, so a bf16 model never exists in fp32 (a 7B
// model would peak at 28 GB). Sets the process-wide default dtype while alive: construct
// models from one thread.
class DefaultDtypeGuard {
 public:
  explicit DefaultDtypeGuard(at::ScalarType dtype) : saved_(c10::get_default_dtype()) {
    c10::set_default_dtype(c10::scalarTypeToTypeMeta(dtype));
  }
  ~DefaultDtypeGuard() { c10::set_default_dtype(saved_); }

 private:
  caffe2::TypeMeta saved_;
};

}  // namespace

void LlamaForCausalLMImpl::reset() {
  const DefaultDtypeGuard dtype_guard(config.dtype);
  model = register_module("model", LlamaModel(config));
  lm_head = register_module("lm_head", nn::ChunkedLMHeadLoss(nn::ChunkedLMHeadLossOptions(config.hidden_size,
                                                                                          config.vocab_size)
                                                                 .chunk(config.loss_chunk_size)
                                                                 .float32_logits(config.float32_logits)));
  if (config.tie_word_embeddings) lm_head->tie(model->embed_tokens->weight);
  if (init_weights) reset_parameters();
}

void LlamaForCausalLMImpl::quantize_bitlinear() {
  TORCH_CHECK(config.bitlinear, "quantize_bitlinear: this LLaMA has no BitLinear layers (config.bitlinear is false)");
  for (const auto& module : modules(/*include_self=*/false)) {
    if (auto* bit = module->as<nn::BitLinear>()) bit->quantize();
  }
  config.quantization = "ternary";
}

int64_t LlamaForCausalLMImpl::unquantized_bitlinear_layers() const {
  int64_t count = 0;
  for (const auto& module : modules(/*include_self=*/false)) {
    const auto* bit = module->as<nn::BitLinear>();
    count += bit != nullptr && !bit->quantized();
  }
  return count;
}

void LlamaForCausalLMImpl::add_lora(const LoRAConfig& lora_config) {
  TORCH_CHECK(!lora, "add_lora: the model has adapters already");
  TORCH_CHECK(config.quantization == "none", "add_lora: a quantized bLLaMA only runs inference; add adapters to its "
              "full-precision checkpoint");
  for (at::Tensor& parameter : parameters()) parameter.requires_grad_(false);
  std::vector<std::string> attention, mlp;
  for (const std::string& name : lora_config.target_modules) {
    const bool is_attention = std::find(kAttentionProjections.begin(), kAttentionProjections.end(), name) !=
                              kAttentionProjections.end();
    (is_attention ? attention : mlp).push_back(name);
  }
  if (!mlp.empty() && config.num_local_experts > 0) {
    throw_input_error("LoRA: {} adapters on an MoE model's MLPs are not supported (its experts take none); target "
                      "the attention projections (--finetune.lora_target=attention)", mlp.front());
  }
  for (const auto& module : *model->layers) {
    auto& layer = *module->as<LlamaDecoderLayer>();
    layer.self_attn->add_lora(attention, lora_config.options);
    if (layer.mlp.is_empty()) continue;  // an MoE layer: its experts keep no adapters
    if (auto* ffn = layer.mlp.ptr()->as<nn::BlockwiseFeedForward>()) ffn->add_lora(mlp, lora_config.options);
    if (auto* ffn = layer.mlp.ptr()->as<nn::BitFeedForward>()) ffn->add_lora(mlp, lora_config.options);
  }
  lora = lora_config;
}

void LlamaForCausalLMImpl::merge_lora() {
  if (!lora) return;
  TORCH_CHECK(!config.bitlinear, "merge_lora: a bLLaMA's adapters cannot be merged (its BitLinear weights are "
              "quantized to ternary levels in every forward; W + BA has other levels); keep the adapter beside it");
  for (const auto& module : *model->layers) {
    auto& layer = *module->as<LlamaDecoderLayer>();
    layer.self_attn->merge_lora();
    if (layer.mlp.is_empty()) continue;  // an MoE layer
    auto* ffn = layer.mlp.ptr()->as<nn::BlockwiseFeedForward>();
    TORCH_CHECK(ffn != nullptr, "merge_lora: layer ", layer.index, "'s MLP is not a BlockwiseFeedForward");
    ffn->merge_lora();
  }
  lora.reset();
}

void LlamaForCausalLMImpl::reset_parameters() {
  at::NoGradGuard no_grad;
  for (at::Tensor& parameter : parameters()) {
    if (parameter.dim() == 1) {
      parameter.fill_(1.0);  // RMSNorm weights; LLaMA has no biases
    } else {
      parameter.normal_(0.0, config.initializer_range);
    }
  }
}

void LlamaForCausalLMImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::models::llama::LlamaForCausalLM(layers=" << config.num_hidden_layers
         << ", hidden=" << config.hidden_size << ", heads=" << config.num_attention_heads << "/"
         << config.num_key_value_heads << ", vocab=" << config.vocab_size << ", dtype=" << dtype_string(config.dtype)
         << ")";
}

nn::LMLoss LlamaForCausalLMImpl::forward(const at::Tensor& input_ids, const at::Tensor& targets,
                                         const std::optional<at::Tensor>& segment_ids,
                                         const std::optional<at::Tensor>& position_ids) {
  nn::LMLoss out = lm_head(model(input_ids, segment_ids, position_ids), targets);
  if (model->router_loss.defined()) out.loss = out.loss + model->router_loss.to(out.loss.scalar_type());
  return out;
}

nn::RouterStats LlamaForCausalLMImpl::router_stats() const {
  nn::RouterStats mean;
  double layers = 0;
  for (const auto& module : *model->layers) {
    const auto& layer = *module->as<LlamaDecoderLayer>();
    if (!layer.block_sparse_moe) continue;
    const nn::RouterStats& stats = layer.block_sparse_moe->last_stats;
    mean.aux_loss += stats.aux_loss;
    mean.z_loss += stats.z_loss;
    mean.dropped_fraction += stats.dropped_fraction;
    ++layers;
  }
  if (layers > 0) {
    mean.aux_loss /= layers;
    mean.z_loss /= layers;
    mean.dropped_fraction /= layers;
  }
  return mean;
}

at::Tensor LlamaForCausalLMImpl::logits(const at::Tensor& input_ids, const std::optional<at::Tensor>& segment_ids,
                                        const std::optional<at::Tensor>& position_ids, KVCache* cache,
                                        bool last_only) {
  at::Tensor h = model(input_ids, segment_ids, position_ids, cache);
  if (last_only) h = h.narrow(1, h.size(1) - 1, 1);
  const at::Tensor logits = lm_head->logits(h);
  return config.float32_logits ? logits.to(at::kFloat) : logits;
}

KVCache LlamaForCausalLMImpl::make_cache(int64_t batch, int64_t capacity) const {
  TORCH_CHECK(batch > 0 && capacity > 0, "make_cache: batch and capacity must be positive");
  const auto options = lm_head->weight.options().requires_grad(false);
  KVCache cache;
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    cache.keys.push_back(
        at::zeros({batch, config.num_key_value_heads, capacity, config.resolved_head_dim()}, options));
    cache.values.push_back(at::zeros_like(cache.keys.back()));
  }
  cache.segment_ids = at::zeros({batch, capacity}, options.dtype(at::kLong));
  return cache;
}

}  // namespace bpt::models::llama
