#include "models/llama/config.h"

#include <c10/util/Exception.h>

#include <functional>
#include <map>
#include <string_view>
#include <nlohmann/json.hpp>

#include "csrc/common/error.h"
#include "csrc/common/text.h"

namespace bpt::models::llama {
namespace {

using nlohmann::json;

// One settable field: its name, how to print it and how to parse it.
struct Field {
  const char* name;
  std::function<std::string(const LlamaConfig&)> get;
  std::function<void(LlamaConfig&, const std::string&)> set;
};

std::string text_of(int64_t value) { return std::to_string(value); }
std::string text_of(double value) { return fmt::format("{}", value); }
std::string text_of(bool value) { return value ? "true" : "false"; }

#define BPT_INT_FIELD(path) \
  Field{#path, [](const LlamaConfig& c) { return text_of(c.path); }, \
        [](LlamaConfig& c, const std::string& v) { c.path = parse_int(v, #path); }}
#define BPT_DOUBLE_FIELD(path) \
  Field{#path, [](const LlamaConfig& c) { return text_of(c.path); }, \
        [](LlamaConfig& c, const std::string& v) { c.path = parse_double(v, #path); }}
#define BPT_BOOL_FIELD(path) \
  Field{#path, [](const LlamaConfig& c) { return text_of(c.path); }, \
        [](LlamaConfig& c, const std::string& v) { c.path = parse_bool(v, #path); }}

const std::vector<Field>& field_table() {
  static const std::vector<Field> table = {
      BPT_INT_FIELD(vocab_size),
      BPT_INT_FIELD(hidden_size),
      BPT_INT_FIELD(intermediate_size),
      BPT_INT_FIELD(num_hidden_layers),
      BPT_INT_FIELD(num_attention_heads),
      BPT_INT_FIELD(num_key_value_heads),
      BPT_INT_FIELD(head_dim),
      BPT_INT_FIELD(max_sequence_length),
      BPT_DOUBLE_FIELD(rms_norm_eps),
      BPT_DOUBLE_FIELD(rope_theta),
      Field{"rope_scaling.type", [](const LlamaConfig& c) { return c.rope_scaling.type(); },
            [](LlamaConfig& c, const std::string& v) { c.rope_scaling.type(v); }},
      Field{"rope_scaling.factor", [](const LlamaConfig& c) { return text_of(c.rope_scaling.factor()); },
            [](LlamaConfig& c, const std::string& v) { c.rope_scaling.factor(parse_double(v, "rope_scaling.factor")); }},
      Field{"rope_scaling.low_freq_factor",
            [](const LlamaConfig& c) { return text_of(c.rope_scaling.low_freq_factor()); },
            [](LlamaConfig& c, const std::string& v) {
              c.rope_scaling.low_freq_factor(parse_double(v, "rope_scaling.low_freq_factor"));
            }},
      Field{"rope_scaling.high_freq_factor",
            [](const LlamaConfig& c) { return text_of(c.rope_scaling.high_freq_factor()); },
            [](LlamaConfig& c, const std::string& v) {
              c.rope_scaling.high_freq_factor(parse_double(v, "rope_scaling.high_freq_factor"));
            }},
      Field{"rope_scaling.original_max_position_embeddings",
            [](const LlamaConfig& c) { return text_of(c.rope_scaling.original_max_position_embeddings()); },
            [](LlamaConfig& c, const std::string& v) {
              c.rope_scaling.original_max_position_embeddings(
                  parse_int(v, "rope_scaling.original_max_position_embeddings"));
            }},
      BPT_BOOL_FIELD(tie_word_embeddings),
      BPT_DOUBLE_FIELD(initializer_range),
      BPT_INT_FIELD(bos_token_id),
      Field{"eos_token_ids",
            [](const LlamaConfig& c) { return fmt::format("{}", fmt::join(c.eos_token_ids, ",")); },
            [](LlamaConfig& c, const std::string& v) {
              c.eos_token_ids.clear();
              const size_t first = v.find_first_not_of("[ "), last = v.find_last_not_of("] ");
              const std::string list = first == std::string::npos ? "" : v.substr(first, last - first + 1);
              for (const std::string& id : split(list, ',')) c.eos_token_ids.push_back(parse_int(id, "eos_token_ids"));
            }},
      Field{"pad_token_id", [](const LlamaConfig& c) { return c.pad_token_id ? text_of(*c.pad_token_id) : "none"; },
            [](LlamaConfig& c, const std::string& v) {
              c.pad_token_id = v == "none" || v.empty() ? std::nullopt : std::optional(parse_int(v, "pad_token_id"));
            }},
      BPT_INT_FIELD(q_chunk_size),
      BPT_INT_FIELD(k_chunk_size),
      BPT_INT_FIELD(ffn_chunk_size),
      BPT_INT_FIELD(loss_chunk_size),
      BPT_INT_FIELD(head_chunk_size),
      BPT_BOOL_FIELD(float32_logits),
      Field{"remat_policy", [](const LlamaConfig& c) { return c.remat_policy; },
            [](LlamaConfig& c, const std::string& v) { c.remat_policy = v; }},
      BPT_BOOL_FIELD(scan_layers),
      Field{"dtype", [](const LlamaConfig& c) { return dtype_string(c.dtype); },
            [](LlamaConfig& c, const std::string& v) { c.dtype = parse_dtype(v, "dtype"); }},
      BPT_BOOL_FIELD(bitlinear),
      Field{"quantization", [](const LlamaConfig& c) { return c.quantization; },
            [](LlamaConfig& c, const std::string& v) { c.quantization = v; }},
      BPT_INT_FIELD(num_local_experts),
      BPT_INT_FIELD(num_experts_per_tok),
      BPT_INT_FIELD(moe_layer_freq),
      BPT_DOUBLE_FIELD(capacity_factor),
      BPT_DOUBLE_FIELD(eval_capacity_factor),
      BPT_DOUBLE_FIELD(router_aux_loss_coef),
      BPT_DOUBLE_FIELD(router_z_loss_coef),
      Field{"expert_activation", [](const LlamaConfig& c) { return c.expert_activation; },
            [](LlamaConfig& c, const std::string& v) { c.expert_activation = v; }},
  };
  return table;
}

#undef BPT_INT_FIELD
#undef BPT_DOUBLE_FIELD
#undef BPT_BOOL_FIELD

std::vector<std::string> field_names() {
  std::vector<std::string> names;
  for (const Field& field : field_table()) names.emplace_back(field.name);
  return names;
}

void check_chunk(const char* name, int64_t chunk) {
  if (chunk != -1 && chunk < 1) throw_input_error("{}: expected a positive chunk size or -1 (none), got {}", name, chunk);
}

}  // namespace

void LlamaConfig::validate() const {
  const auto positive = [](const char* name, int64_t value) {
    if (value < 1) throw_input_error("{}: expected a positive integer, got {}", name, value);
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("max_sequence_length", max_sequence_length);
  if (head_dim == 0 && hidden_size % num_attention_heads != 0) {
    throw_input_error("hidden_size: {} is not divisible by num_attention_heads {} (or set head_dim)", hidden_size,
                      num_attention_heads);
  }
  if (head_dim < 0 || resolved_head_dim() % 2 != 0) {
    throw_input_error("head_dim: expected a positive even size (rotary pairs), got {}", resolved_head_dim());
  }
  if (num_attention_heads % num_key_value_heads != 0) {
    throw_input_error("num_key_value_heads: {} does not divide num_attention_heads {}", num_key_value_heads,
                      num_attention_heads);
  }
  if (!(rms_norm_eps > 0)) throw_input_error("rms_norm_eps: expected a positive number, got {}", rms_norm_eps);
  if (!(rope_theta > 0)) throw_input_error("rope_theta: expected a positive number, got {}", rope_theta);
  const std::string& scaling = rope_scaling.type();
  if (scaling != "default" && scaling != "linear" && scaling != "llama3") {
    throw_input_error("rope_scaling.type: expected default, linear or llama3, got '{}'", scaling);
  }
  if (scaling != "default" && !(rope_scaling.factor() > 0)) {
    throw_input_error("rope_scaling.factor: expected a positive number, got {}", rope_scaling.factor());
  }
  if (scaling == "llama3" && !(rope_scaling.high_freq_factor() > rope_scaling.low_freq_factor())) {
    throw_input_error("rope_scaling: llama3 needs high_freq_factor ({}) > low_freq_factor ({})",
                      rope_scaling.high_freq_factor(), rope_scaling.low_freq_factor());
  }
  for (const int64_t id : eos_token_ids) {
    if (id < 0 || id >= vocab_size) throw_input_error("eos_token_ids: {} is outside the vocabulary [0, {})", id, vocab_size);
  }
  if (quantization != "none" && quantization != "ternary") {
    throw_input_error("quantization: expected none or ternary, got '{}'", quantization);
  }
  if (quantization != "none" && !bitlinear) {
    throw_input_error("quantization: {} applies to BitLinear layers only (bitlinear = false)", quantization);
  }
  if (bos_token_id >= vocab_size) {
    throw_input_error("bos_token_id: {} is outside the vocabulary [0, {})", bos_token_id, vocab_size);
  }
  check_chunk("q_chunk_size", q_chunk_size);
  check_chunk("k_chunk_size", k_chunk_size);
  check_chunk("ffn_chunk_size", ffn_chunk_size);
  check_chunk("loss_chunk_size", loss_chunk_size);
  check_chunk("head_chunk_size", head_chunk_size);
  if (num_local_experts < 0) throw_input_error("num_local_experts: expected >= 0 (0: dense), got {}", num_local_experts);
  if (num_local_experts > 0) {
    if (num_experts_per_tok < 1 || num_experts_per_tok > num_local_experts) {
      throw_input_error("num_experts_per_tok: expected 1 to num_local_experts ({}), got {}", num_local_experts,
                        num_experts_per_tok);
    }
    positive("moe_layer_freq", moe_layer_freq);
    if (moe_layer_freq > num_hidden_layers) {
      throw_input_error("moe_layer_freq: {} is more than num_hidden_layers {}: no layer would be an MoE layer",
                        moe_layer_freq, num_hidden_layers);
    }
    if (!(capacity_factor >= 0) || !(eval_capacity_factor >= 0)) {
      throw_input_error("capacity_factor / eval_capacity_factor: expected >= 0 (0: dropless), got {} / {}",
                        capacity_factor, eval_capacity_factor);
    }
    if (!(router_aux_loss_coef >= 0) || !(router_z_loss_coef >= 0)) {
      throw_input_error("router_aux_loss_coef / router_z_loss_coef: expected >= 0");
    }
    if (expert_activation != "silu" && expert_activation != "gelu") {
      throw_input_error("expert_activation: expected silu or gelu, got '{}'", expert_activation);
    }
    if (bitlinear) throw_input_error("num_local_experts: a bLLaMA (bitlinear) has no MoE layers");
  }
  if (remat_policy != "nothing_saveable" && remat_policy != "checkpoint_dots" && remat_policy != "everything_saveable") {
    throw_input_error("remat_policy: expected nothing_saveable, checkpoint_dots or everything_saveable, got '{}'",
                      remat_policy);
  }
}

void LlamaConfig::set(const std::string& name, const std::string& value) {
  for (const Field& field : field_table()) {
    if (name == field.name) return field.set(*this, value);
  }
  throw InputError(unknown_name_message("llama config field", name, field_names()));
}

std::vector<std::pair<std::string, std::string>> LlamaConfig::fields() const {
  std::vector<std::pair<std::string, std::string>> result;
  for (const Field& field : field_table()) result.emplace_back(field.name, field.get(*this));
  return result;
}

void LlamaConfig::update(const std::string& assignments) {
  // "a=1,eos_token_ids=2,3,b=4": a piece without '=' continues the previous value (a list).
  std::vector<std::string> merged;
  for (const std::string& piece : split(assignments, ',')) {
    if (piece.find('=') == std::string::npos && !merged.empty()) {
      merged.back() += "," + piece;
    } else {
      merged.push_back(piece);
    }
  }
  for (const std::string& assignment : merged) {
    const size_t equals = assignment.find('=');
    if (equals == std::string::npos) {
      throw_input_error("update_llama_config: expected field=value, got '{}'", assignment);
    }
    set(assignment.substr(0, equals), assignment.substr(equals + 1));
  }
}

LlamaConfig preset(const std::string& name) {
  // llamabpt's sizes (EasyLM's LLAMA_STANDARD_CONFIGS) and Meta's published LLaMA 2 / 3 ones.
  struct Size {
    const char* name;
    int64_t vocab, hidden, intermediate, layers, heads, kv_heads, max_len;
    double eps, theta;
  };
  static constexpr Size sizes[] = {
      {"tiny", 256, 64, 160, 2, 4, 2, 512, 1e-6, 10000},
      {"1b", 32000, 2048, 5504, 22, 16, 16, 2048, 1e-6, 10000},
      {"3b", 32000, 3200, 8640, 26, 32, 32, 2048, 1e-6, 10000},
      {"7b", 32000, 4096, 11008, 32, 32, 32, 2048, 1e-6, 10000},
      {"13b", 32000, 5120, 13824, 40, 40, 40, 2048, 1e-6, 10000},
      {"30b", 32000, 6656, 17920, 60, 52, 52, 2048, 1e-6, 10000},
      {"65b", 32000, 8192, 22016, 80, 64, 64, 2048, 1e-5, 10000},
      {"llama2-7b", 32000, 4096, 11008, 32, 32, 32, 4096, 1e-5, 10000},
      {"llama2-13b", 32000, 5120, 13824, 40, 40, 40, 4096, 1e-5, 10000},
      {"llama2-70b", 32000, 8192, 28672, 80, 64, 8, 4096, 1e-5, 10000},
      {"llama3-8b", 128256, 4096, 14336, 32, 32, 8, 8192, 1e-5, 500000},
      {"bllama-1.7b", 32000, 2048, 8192, 24, 32, 32, 2048, 1e-6, 10000},
      {"bllama-tiny", 256, 64, 160, 2, 4, 2, 512, 1e-6, 10000},
      // GLaM (Pax's configs): the dense base's sizes; make_glam adds the experts.
      {"glam-126m-64e", 32000, 768, 3072, 12, 12, 12, 2048, 1e-6, 10000},
      {"glam-64b-64e", 32000, 8192, 32768, 64, 128, 128, 2048, 1e-6, 10000},
      {"glam-tiny", 256, 64, 96, 2, 4, 2, 512, 1e-6, 10000},
  };
  for (const Size& size : sizes) {
    if (name != size.name) continue;
    LlamaConfig config;
    config.vocab_size = size.vocab;
    config.hidden_size = size.hidden;
    config.intermediate_size = size.intermediate;
    config.num_hidden_layers = size.layers;
    config.num_attention_heads = size.heads;
    config.num_key_value_heads = size.kv_heads;
    config.max_sequence_length = size.max_len;
    config.rms_norm_eps = size.eps;
    config.rope_theta = size.theta;
    if (name == "llama3-8b") {
      config.bos_token_id = 128000;
      config.eos_token_ids = {128001};
    }
    config.bitlinear = std::string_view(name).starts_with("bllama-");
    if (std::string_view(name).starts_with("glam-")) {
      make_glam(config);
      if (name == "glam-tiny") config.num_local_experts = 4;
    }
    return config;
  }
  throw InputError(unknown_name_message("llama config preset", name, preset_names()) +
                   fmt::format(" (presets: {})", fmt::join(preset_names(), ", ")));
}

std::vector<std::string> preset_names() {
  return {"tiny",        "1b",          "3b",          "7b",            "13b",          "30b",      "65b",
          "llama2-7b",   "llama2-13b",  "llama2-70b",  "llama3-8b",     "bllama-1.7b",  "bllama-tiny",
          "glam-126m-64e", "glam-64b-64e", "glam-tiny"};
}

void make_glam(LlamaConfig& config) {
  if (config.num_local_experts > 0) return;
  config.num_local_experts = 64;
  config.num_experts_per_tok = 2;
  config.moe_layer_freq = 2;
  config.capacity_factor = 2.0;
  config.eval_capacity_factor = 0;  // dropless inference: decoding token by token computes what a full forward does
  config.router_aux_loss_coef = 0.01;
  config.router_z_loss_coef = 1e-4;
  config.expert_activation = "gelu";
}

c10::ScalarType parse_dtype(const std::string& text, const std::string& field) {
  if (text == "float32" || text == "fp32" || text == "f32") return c10::ScalarType::Float;
  if (text == "bfloat16" || text == "bf16") return c10::ScalarType::BFloat16;
  if (text == "float16" || text == "fp16" || text == "f16") return c10::ScalarType::Half;
  throw_input_error("{}: expected float32, bfloat16 or float16, got '{}'", field, text);
}

std::string dtype_string(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Half: return "float16";
    default: TORCH_CHECK(false, "dtype_string: ", dtype, " is not a model dtype");
  }
}

namespace {

// Field `key` of `json` as T, or `fallback` when absent or null.
template <typename T>
T get_or(const json& object, const char* key, T fallback, const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    throw_input_error("{}: field '{}' = {} has the wrong type", where, key, it->dump());
  }
}

void read_rope(const json& rope, LlamaConfig& config, const std::string& where) {
  if (!rope.is_object()) throw_input_error("{}: rope settings must be an object, got {}", where, rope.dump());
  config.rope_theta = get_or(rope, "rope_theta", config.rope_theta, where);
  // transformers 4 says "type" in older files and "rope_type" in newer ones.
  const std::string type = get_or(rope, "rope_type", get_or(rope, "type", std::string("default"), where), where);
  config.rope_scaling.type(type);
  config.rope_scaling.factor(get_or(rope, "factor", 1.0, where));
  config.rope_scaling.low_freq_factor(get_or(rope, "low_freq_factor", 1.0, where));
  config.rope_scaling.high_freq_factor(get_or(rope, "high_freq_factor", 4.0, where));
  config.rope_scaling.original_max_position_embeddings(
      get_or(rope, "original_max_position_embeddings", int64_t{8192}, where));
}

}  // namespace

LlamaConfig from_hf_json(const json& hf, const std::string& where) {
  if (!hf.is_object()) throw_input_error("{}: expected a JSON object", where);
  const std::string model_type = get_or(hf, "model_type", std::string("llama"), where);
  if (model_type != "llama" && model_type != "bllama" && model_type != "mixtral" && model_type != "glam") {
    throw_input_error("{}: model_type is '{}', expected 'llama' or 'mixtral' (or bpt's 'bllama', 'glam')", where,
                      model_type);
  }
  if (get_or(hf, "attention_bias", false, where) || get_or(hf, "mlp_bias", false, where)) {
    throw_input_error("{}: attention_bias / mlp_bias = true is not supported (LLaMA has no biases)", where);
  }
  const std::string act = get_or(hf, "hidden_act", std::string("silu"), where);
  if (act != "silu") throw_input_error("{}: hidden_act is '{}', expected 'silu' (SwiGLU)", where, act);

  LlamaConfig config;
  config.bitlinear = model_type == "bllama";
  if (model_type == "mixtral" || model_type == "glam") {
    config.num_local_experts = get_or(hf, "num_local_experts", int64_t{8}, where);
    config.num_experts_per_tok = get_or(hf, "num_experts_per_tok", config.num_experts_per_tok, where);
    config.router_aux_loss_coef = get_or(hf, "router_aux_loss_coef", config.router_aux_loss_coef, where);
    if (get_or(hf, "router_jitter_noise", 0.0, where) != 0) {
      throw_input_error("{}: router_jitter_noise is not supported (expected 0)", where);
    }
    if (!get_or(hf, "sliding_window", json(nullptr), where).is_null()) {
      throw_input_error("{}: sliding_window attention is not supported (expected null)", where);
    }
  }
  config.vocab_size = get_or(hf, "vocab_size", config.vocab_size, where);
  config.hidden_size = get_or(hf, "hidden_size", config.hidden_size, where);
  config.intermediate_size = get_or(hf, "intermediate_size", config.intermediate_size, where);
  config.num_hidden_layers = get_or(hf, "num_hidden_layers", config.num_hidden_layers, where);
  config.num_attention_heads = get_or(hf, "num_attention_heads", config.num_attention_heads, where);
  config.num_key_value_heads = get_or(hf, "num_key_value_heads", config.num_attention_heads, where);
  config.head_dim = get_or(hf, "head_dim", int64_t{0}, where);
  if (config.head_dim * config.num_attention_heads == config.hidden_size) config.head_dim = 0;
  config.max_sequence_length = get_or(hf, "max_position_embeddings", config.max_sequence_length, where);
  config.rms_norm_eps = get_or(hf, "rms_norm_eps", config.rms_norm_eps, where);
  config.tie_word_embeddings = get_or(hf, "tie_word_embeddings", config.tie_word_embeddings, where);
  config.initializer_range = get_or(hf, "initializer_range", config.initializer_range, where);
  config.bos_token_id = get_or(hf, "bos_token_id", config.bos_token_id, where);
  if (hf.contains("eos_token_id") && !hf["eos_token_id"].is_null()) {
    const json& eos = hf["eos_token_id"];
    config.eos_token_ids = eos.is_array() ? get_or(hf, "eos_token_id", std::vector<int64_t>{}, where)
                                          : std::vector<int64_t>{get_or(hf, "eos_token_id", int64_t{2}, where)};
  }
  if (hf.contains("pad_token_id") && !hf["pad_token_id"].is_null()) {
    config.pad_token_id = get_or(hf, "pad_token_id", int64_t{0}, where);
  }
  // transformers 5: rope_parameters {rope_theta, rope_type, factor, ...}; 4: rope_theta + rope_scaling.
  if (hf.contains("rope_parameters") && !hf["rope_parameters"].is_null()) {
    read_rope(hf["rope_parameters"], config, where);
  } else {
    config.rope_theta = get_or(hf, "rope_theta", config.rope_theta, where);
    if (hf.contains("rope_scaling") && !hf["rope_scaling"].is_null()) {
      json rope = hf["rope_scaling"];
      rope["rope_theta"] = config.rope_theta;
      read_rope(rope, config, where);
    }
  }
  const std::string dtype = get_or(hf, "dtype", get_or(hf, "torch_dtype", std::string("float32"), where), where);
  config.dtype = parse_dtype(dtype, where + ": dtype");

  if (hf.contains("bpt")) {
    const json& extra = hf["bpt"];
    if (!extra.is_object()) throw_input_error("{}: 'bpt' must be an object", where);
    for (const auto& [key, value] : extra.items()) {
      try {
        config.set(key, value.is_string() ? value.get<std::string>() : value.dump());
      } catch (const InputError& e) {
        throw_input_error("{}: bpt.{}", where, e.what());
      }
    }
  }
  try {
    config.validate();
  } catch (const InputError& e) {
    throw_input_error("{}: {}", where, e.what());
  }
  return config;
}

json to_hf_json(const LlamaConfig& c) {
  json rope = {{"rope_theta", c.rope_theta}, {"rope_type", c.rope_scaling.type()}};
  if (c.rope_scaling.type() != "default") rope["factor"] = c.rope_scaling.factor();
  if (c.rope_scaling.type() == "llama3") {
    rope["low_freq_factor"] = c.rope_scaling.low_freq_factor();
    rope["high_freq_factor"] = c.rope_scaling.high_freq_factor();
    rope["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings();
  }
  // A bLLaMA checkpoint is bpt's own: its extra norms and packed weights are nothing
  // transformers' LlamaForCausalLM could load, so it does not claim to be one. An MoE model is
  // a Mixtral when transformers' MixtralForCausalLM computes the same (SwiGLU experts in
  // every layer, dropless), else bpt's GLaM.
  const bool mixtral = c.num_local_experts > 0 && c.moe_layer_freq == 1 && c.expert_activation == "silu" &&
                       c.capacity_factor == 0 && c.eval_capacity_factor == 0 && c.router_z_loss_coef == 0;
  const std::string model_type = c.bitlinear ? "bllama" : c.num_local_experts == 0 ? "llama" : mixtral ? "mixtral" : "glam";
  const std::map<std::string, std::string> architectures = {{"bllama", "BllamaForCausalLM"},
                                                            {"llama", "LlamaForCausalLM"},
                                                            {"mixtral", "MixtralForCausalLM"},
                                                            {"glam", "GlamForCausalLM"}};
  json hf = {
      {"architectures", {architectures.at(model_type)}},
      {"model_type", model_type},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.resolved_head_dim()},
      {"max_position_embeddings", c.max_sequence_length},
      {"rms_norm_eps", c.rms_norm_eps},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"initializer_range", c.initializer_range},
      {"bos_token_id", c.bos_token_id},
      {"pad_token_id", c.pad_token_id ? json(*c.pad_token_id) : json(nullptr)},
      // transformers 5 reads rope_parameters; 4 reads rope_theta and rope_scaling.
      {"rope_parameters", rope},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", c.rope_scaling.type() == "default" ? json(nullptr) : rope},
      {"dtype", dtype_string(c.dtype)},
      {"torch_dtype", dtype_string(c.dtype)},
  };
  hf["eos_token_id"] = c.eos_token_ids.size() == 1 ? json(c.eos_token_ids[0]) : json(c.eos_token_ids);
  hf["bpt"] = {
      {"q_chunk_size", c.q_chunk_size},       {"k_chunk_size", c.k_chunk_size},
      {"ffn_chunk_size", c.ffn_chunk_size},   {"loss_chunk_size", c.loss_chunk_size},
      {"head_chunk_size", c.head_chunk_size}, {"float32_logits", c.float32_logits},
      {"remat_policy", c.remat_policy},       {"scan_layers", c.scan_layers},
  };
  if (c.bitlinear) hf["bpt"]["quantization"] = c.quantization;
  if (c.num_local_experts > 0) {
    hf["num_local_experts"] = c.num_local_experts;
    hf["num_experts_per_tok"] = c.num_experts_per_tok;
    hf["router_aux_loss_coef"] = c.router_aux_loss_coef;
    hf["router_jitter_noise"] = 0.0;
    hf["output_router_logits"] = false;
    hf["sliding_window"] = nullptr;
    hf["bpt"].update({{"moe_layer_freq", c.moe_layer_freq},
                      {"capacity_factor", c.capacity_factor},
                      {"eval_capacity_factor", c.eval_capacity_factor},
                      {"router_z_loss_coef", c.router_z_loss_coef},
                      {"expert_activation", c.expert_activation}});
  }
  return hf;
}

}  // namespace bpt::models::llama
