#include "csrc/io/hf_checkpoint.h"

#include <ATen/ATen.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <map>
#include <set>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"
#include "csrc/io/safetensors.h"
#include "csrc/io/sharded_checkpoint.h"
#include "models/llama/hf_names.h"

namespace bpt::io {
namespace fs = std::filesystem;
using models::llama::LlamaConfig;

namespace {

// The model's parameters and buffers (packed ternary weights are buffers), by name.
std::map<std::string, at::Tensor> model_tensors(const models::llama::LlamaForCausalLMImpl& model) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& item : model.named_parameters()) tensors[item.key()] = item.value();
  for (const auto& item : model.named_buffers()) tensors[item.key()] = item.value();
  return tensors;
}

// A quantized bLLaMA's packed weights hold only the codes 00, 01, 10 (-1, 0, +1), and its
// scales are finite and positive: anything else is a corrupt file, not a model.
void check_packed_values(const std::string& name, const at::Tensor& tensor, const std::string& where) {
  if (name.ends_with(".weight_packed")) {
    const at::Tensor code_11 = at::bitwise_and(at::bitwise_and(tensor, at::bitwise_right_shift(tensor, 1)), 0x55);
    if (code_11.any().item<bool>()) {
      throw_input_error("{}: tensor '{}' holds the 2-bit code 11, which no ternary value has (expected 00, 01 or "
                        "10 for -1, 0, +1)", where, name);
    }
  } else if (name.ends_with(".weight_scale")) {
    const double scale = tensor.to(at::kDouble).item<double>();
    if (!std::isfinite(scale) || !(scale > 0)) {
      throw_input_error("{}: tensor '{}' is {}, expected a finite scale > 0", where, name, scale);
    }
  }
}

}  // namespace

LlamaConfig read_llama_config(const std::string& dir) {
  const std::string path = (fs::path(dir) / "config.json").string();
  std::ifstream stream(path);
  if (!stream) throw_input_error("{}: cannot open (is {} a model directory?)", path, dir);
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(stream);
  } catch (const nlohmann::json::exception& e) {
    throw_input_error("{}: not valid JSON: {}", path, e.what());
  }
  return models::llama::from_hf_json(json, path);
}

void read_llama_weights(const LlamaConfig& config, const TensorReader& checkpoint, const std::string& dir,
                        const std::function<void(const std::string&, const at::Tensor&)>& use) {
  std::set<std::string> used;
  for (const auto& [hf, shape] : models::llama::hf_tensor_shapes(config)) {
    if (!checkpoint.contains(hf)) {
      throw_input_error("{}: missing tensor '{}' (expected {} for this config)", dir, hf, shape_string(shape));
    }
    const TensorInfo& info = checkpoint.info(hf);
    if (info.shape != shape) {
      throw_input_error("{}: tensor '{}' has shape {}, expected {} (vocab_size {}, hidden_size {}, intermediate_size "
                        "{}, heads {}/{})", checkpoint.where(hf), hf, shape_string(info.shape), shape_string(shape),
                        config.vocab_size, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                        config.num_key_value_heads);
    }
    if (hf.ends_with(".weight_packed") ? info.dtype != at::kByte : !at::isFloatingType(info.dtype)) {
      throw_input_error("{}: tensor '{}' is {}, expected {}", checkpoint.where(hf), hf, dtype_name(info.dtype),
                        hf.ends_with(".weight_packed") ? "U8 (packed ternary weights)" : "a float type (F32, BF16, F16)");
    }
    const at::Tensor tensor = checkpoint.tensor(hf);
    check_packed_values(hf, tensor, checkpoint.where(hf));
    use(models::llama::bpt_name(hf), tensor);
    used.insert(hf);
  }
  for (const std::string& hf : checkpoint.names()) {
    if (!used.count(hf) && !models::llama::hf_ignorable(hf, config)) {
      throw_input_error("{}: unexpected tensor '{}': this LLaMA config ({} layers{}) has no such parameter",
                        checkpoint.where(hf), hf, config.num_hidden_layers,
                        config.tie_word_embeddings ? ", tied embeddings" : "");
    }
  }
}

void load_llama_weights(models::llama::LlamaForCausalLMImpl& model, const std::string& dir) {
  const auto checkpoint = open_weights(dir);
  auto tensors = model_tensors(model);
  at::NoGradGuard no_grad;
  read_llama_weights(model.config, *checkpoint, dir,
                     [&](const std::string& name, const at::Tensor& tensor) { tensors.at(name).copy_(tensor); });
}

void save_llama(const models::llama::LlamaForCausalLMImpl& model, const std::string& dir,
                const SaveOptions& options) {
  AtomicDirectory output(dir);
  write_llama(model, output.path(), options);
  output.commit();
}

void write_llama(const models::llama::LlamaForCausalLMImpl& model, const std::string& dir,
                 const SaveOptions& options) {
  LlamaConfig config = model.config;
  if (options.dtype) config.dtype = *options.dtype;
  if (config.bitlinear && !options.bpt_fields) {
    throw_input_error("a bLLaMA is bpt's own format (transformers has no model for it): save it with bpt's fields "
                      "(--format bpt)");
  }
  TORCH_CHECK(model.unquantized_bitlinear_layers() == 0 || config.quantization == "none",
              "write_llama: some BitLinear layers are packed and some not; quantize_bitlinear() packs them all");
  const auto held = model_tensors(model);
  NamedTensors tensors;
  for (const auto& [name, shape] : models::llama::hf_tensor_shapes(config)) {
    const auto it = held.find(models::llama::bpt_name(name));
    TORCH_CHECK(it != held.end(), "write_llama: the model has no tensor ", name, " (BitLinear layers packed by hand? "
                "quantize_bitlinear() packs them all and records it in the config)");
    const at::Tensor tensor = it->second.detach();
    // Packed ternary weights and their scales keep their own dtypes.
    const bool packed = name.ends_with(".weight_packed") || name.ends_with(".weight_scale");
    tensors.emplace_back(name, packed ? tensor.cpu() : tensor.to(at::kCPU, config.dtype));
  }
  save_safetensors_dir(dir, tensors, options.max_shard_bytes, {{"format", "pt"}});
  write_llama_config(config, dir, options.bpt_fields);
  if (!options.tokenizer_from.empty()) copy_tokenizer_files(options.tokenizer_from, dir);
}

void write_llama_config(const LlamaConfig& config, const std::string& dir, bool bpt_fields) {
  nlohmann::json json = models::llama::to_hf_json(config);
  if (!bpt_fields) json.erase("bpt");
  write_file_atomically((fs::path(dir) / "config.json").string(), json.dump(2) + "\n");
}

void copy_tokenizer_files(const std::string& from, const std::string& to) {
  for (const char* name : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "generation_config.json"}) {
    const fs::path source = fs::path(from) / name;
    if (fs::exists(source) && fs::weakly_canonical(source) != fs::weakly_canonical(fs::path(to) / name)) {
      fs::copy_file(source, fs::path(to) / name, fs::copy_options::overwrite_existing);
    }
  }
}

}  // namespace bpt::io
