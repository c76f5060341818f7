#include "csrc/io/hf_checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"
#include "csrc/io/safetensors.h"
#include "models/llama/hf_names.h"

namespace bpt::io {
namespace fs = std::filesystem;
using models::llama::LlamaConfig;

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

void load_llama_weights(models::llama::LlamaForCausalLMImpl& model, const std::string& dir) {
  const SafetensorsDir checkpoint(dir);
  std::set<std::string> used;
  at::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    at::Tensor& parameter = item.value();
    const std::string hf = models::llama::hf_name(item.key());
    if (!checkpoint.contains(hf)) {
      throw_input_error("{}: missing tensor '{}' (expected {} for this config)", dir, hf,
                        shape_string(parameter.sizes()));
    }
    const SafetensorsFile& file = checkpoint.file(hf);
    const TensorInfo& info = file.info(hf);
    if (at::IntArrayRef(info.shape) != parameter.sizes()) {
      throw_input_error("{}: tensor '{}' has shape {}, expected {} (vocab_size {}, hidden_size {}, intermediate_size "
                        "{}, heads {}/{})", file.path(), hf, shape_string(info.shape),
                        shape_string(parameter.sizes()), model.config.vocab_size, model.config.hidden_size,
                        model.config.intermediate_size, model.config.num_attention_heads,
                        model.config.num_key_value_heads);
    }
    if (!at::isFloatingType(info.dtype)) {
      throw_input_error("{}: tensor '{}' is {}, expected a float type (F32, BF16, F16)", file.path(), hf,
                        dtype_name(info.dtype));
    }
    parameter.copy_(file.tensor(hf));
    used.insert(hf);
  }
  for (const std::string& hf : checkpoint.names()) {
    if (!used.count(hf) && !models::llama::hf_ignorable(hf, model.config)) {
      throw_input_error("{}: unexpected tensor '{}': this LLaMA config ({} layers{}) has no such parameter",
                        checkpoint.file(hf).path(), hf, model.config.num_hidden_layers,
                        model.config.tie_word_embeddings ? ", tied embeddings" : "");
    }
  }
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
  NamedTensors tensors;
  for (const auto& item : model.named_parameters()) {
    tensors.emplace_back(models::llama::hf_name(item.key()), item.value().detach().to(at::kCPU, config.dtype));
  }
  save_safetensors_dir(dir, tensors, options.max_shard_bytes, {{"format", "pt"}});
  nlohmann::json json = models::llama::to_hf_json(config);
  if (!options.bpt_fields) json.erase("bpt");
  write_file_atomically((fs::path(dir) / "config.json").string(), json.dump(2) + "\n");
  if (!options.tokenizer_from.empty()) copy_tokenizer_files(options.tokenizer_from, dir);
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
