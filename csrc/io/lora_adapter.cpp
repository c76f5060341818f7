#include "csrc/io/lora_adapter.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"
#include "csrc/io/hf_checkpoint.h"

namespace bpt::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kConfigFile = "adapter_config.json";
constexpr const char* kWeightsFile = "adapter_model.safetensors";
// peft saves the adapters of a PeftModelForCausalLM under base_model.model.<the model's name>.
constexpr std::string_view kPeftPrefix = "base_model.model.";

bool is_adapter_tensor(const std::string& name) {
  return name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight");
}

// Fields peft writes that change what the adapter computes, with the value bpt implements.
void check_unsupported(const json& config, const std::string& path) {
  const auto refuse = [&](const char* field, const std::string& expected) {
    throw_input_error("{}: {} = {} is not supported by bpt (expected {})", path, field, config[field].dump(), expected);
  };
  for (const char* field : {"use_dora", "use_rslora", "fan_in_fan_out"}) {
    if (config.contains(field) && !config[field].is_null() && config[field] != false) refuse(field, "false");
  }
  if (config.contains("bias") && config["bias"] != "none") refuse("bias", "\"none\"");
  for (const char* field : {"layers_to_transform", "modules_to_save", "layers_pattern"}) {
    if (config.contains(field) && !config[field].is_null() && config[field] != json::array()) refuse(field, "null");
  }
  for (const char* field : {"rank_pattern", "alpha_pattern"}) {
    if (config.contains(field) && !config[field].is_null() && !config[field].empty()) refuse(field, "{}");
  }
}

// config's base_model_name_or_path (read from dir), checked to be a directory.
std::string base_directory(const AdapterConfig& config, const std::string& dir) {
  if (config.base_model.empty() || !fs::is_directory(config.base_model)) {
    throw_input_error("{}/{}: base_model_name_or_path '{}' is not a directory (bpt reads the base model from disk)",
                      dir, kConfigFile, config.base_model);
  }
  return config.base_model;
}

}  // namespace

bool is_lora_adapter(const std::string& dir) { return fs::is_regular_file(fs::path(dir) / kConfigFile); }

AdapterConfig read_adapter_config(const std::string& dir) {
  const std::string path = (fs::path(dir) / kConfigFile).string();
  std::ifstream stream(path);
  if (!stream) throw_input_error("{}: cannot open", path);
  const json config = json::parse(stream, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) throw_input_error("{}: not a JSON object", path);
  AdapterConfig result;
  try {
    if (config.value("peft_type", std::string()) != "LORA") {
      throw_input_error("{}: peft_type is {}, expected \"LORA\"", path,
                        config.contains("peft_type") ? config["peft_type"].dump() : "missing");
    }
    check_unsupported(config, path);
    const auto rank = config.at("r").get<int64_t>();
    const auto alpha = config.at("lora_alpha").get<double>();
    const double dropout = config.value("lora_dropout", 0.0);
    if (rank < 1) throw_input_error("{}: r must be >= 1, got {}", path, rank);
    if (!(alpha > 0)) throw_input_error("{}: lora_alpha must be > 0, got {}", path, alpha);
    if (!(dropout >= 0 && dropout < 1)) throw_input_error("{}: lora_dropout must be in [0, 1), got {}", path, dropout);
    result.lora.options.rank(rank).alpha(alpha).dropout(dropout);
    const json& targets = config.at("target_modules");
    // peft keeps a set of names (a list), or one regular expression (a string): bpt takes names.
    if (!targets.is_array()) throw_input_error("{}: target_modules: expected a list of projection names", path);
    std::string spec;
    for (const std::string& name : targets.get<std::vector<std::string>>()) spec += (spec.empty() ? "" : ",") + name;
    result.lora.target_modules = models::llama::lora_target_modules(spec, path + ": target_modules");
    if (config.contains("base_model_name_or_path") && config["base_model_name_or_path"].is_string()) {
      result.base_model = config["base_model_name_or_path"].get<std::string>();
    }
  } catch (const json::exception& e) {
    throw_input_error("{}: {} (expected r, lora_alpha and target_modules)", path, e.what());
  }
  return result;
}

std::string adapter_base(const std::string& dir) { return base_directory(read_adapter_config(dir), dir); }

void check_same_adapters(const AdapterConfig& saved, const models::llama::LoRAConfig& current, const std::string& dir) {
  const auto differ = [&](const char* field, const std::string& was, const std::string& now) {
    throw_input_error("{}/{}: {} is {}, but this run asks for {}: resume with the settings the adapters were "
                      "trained with", dir, kConfigFile, field, was, now);
  };
  const nn::LoRAOptions &was = saved.lora.options, &now = current.options;
  if (was.rank() != now.rank()) differ("r", std::to_string(was.rank()), std::to_string(now.rank()));
  if (was.alpha() != now.alpha()) differ("lora_alpha", fmt::format("{}", was.alpha()), fmt::format("{}", now.alpha()));
  if (was.dropout() != now.dropout()) {
    differ("lora_dropout", fmt::format("{}", was.dropout()), fmt::format("{}", now.dropout()));
  }
  if (saved.lora.target_modules != current.target_modules) {
    differ("target_modules", fmt::format("{}", fmt::join(saved.lora.target_modules, ",")),
           fmt::format("{}", fmt::join(current.target_modules, ",")));
  }
}

std::string default_tokenizer(const std::string& dir) {
  const fs::path own = fs::path(dir) / "tokenizer.model";
  if (fs::exists(own) || !is_lora_adapter(dir)) return own.string();
  return (fs::path(adapter_base(dir)) / "tokenizer.model").string();
}

NamedTensors adapter_tensors(const models::llama::LlamaForCausalLMImpl& model) {
  NamedTensors tensors;
  for (const auto& item : model.named_parameters()) {
    if (is_adapter_tensor(item.key())) tensors.emplace_back(item.key(), item.value().detach());
  }
  return tensors;
}

void write_adapter(const AdapterConfig& config, const NamedTensors& tensors, const std::string& dir) {
  NamedTensors stored;
  for (const auto& [name, tensor] : tensors) stored.emplace_back(std::string(kPeftPrefix) + name, tensor.cpu());
  save_safetensors((fs::path(dir) / kWeightsFile).string(), stored, {{"format", "pt"}});
  const nn::LoRAOptions& options = config.lora.options;
  const json document = {{"peft_type", "LORA"},
                         {"task_type", "CAUSAL_LM"},
                         {"r", options.rank()},
                         {"lora_alpha", options.alpha()},
                         {"lora_dropout", options.dropout()},
                         {"target_modules", config.lora.target_modules},
                         {"base_model_name_or_path", config.base_model},
                         {"bias", "none"},
                         {"fan_in_fan_out", false},
                         {"use_rslora", false},
                         {"use_dora", false},
                         {"init_lora_weights", true},
                         {"inference_mode", true},
                         {"modules_to_save", nullptr},
                         {"layers_to_transform", nullptr}};
  write_file_atomically((fs::path(dir) / kConfigFile).string(), document.dump(2) + "\n");
}

void read_adapter_weights(const std::string& dir, const std::map<std::string, std::vector<int64_t>>& shapes,
                          const std::function<void(const std::string&, const at::Tensor&)>& use) {
  const std::string path = (fs::path(dir) / kWeightsFile).string();
  const SafetensorsFile file(path);
  std::set<std::string> used;
  for (const auto& [name, shape] : shapes) {
    if (!is_adapter_tensor(name)) continue;
    const std::string stored = std::string(kPeftPrefix) + name;
    if (!file.contains(stored)) {
      throw_input_error("{}: missing tensor '{}' (adapter_config.json's target_modules and r decide which)", path,
                        stored);
    }
    const TensorInfo& info = file.info(stored);
    if (info.shape != shape || !at::isFloatingType(info.dtype)) {
      throw_input_error("{}: tensor '{}' is {} {}, expected a float tensor of shape {}", path, stored,
                        dtype_name(info.dtype), shape_string(info.shape), shape_string(shape));
    }
    use(name, file.tensor(stored));
    used.insert(stored);
  }
  for (const std::string& name : file.names()) {
    if (!used.count(name)) {
      throw_input_error("{}: unexpected tensor '{}' (adapter_config.json's target_modules have no such adapter)", path,
                        name);
    }
  }
}

void load_adapter_weights(models::llama::LlamaForCausalLMImpl& model, const std::string& dir) {
  std::map<std::string, at::Tensor> parameters;
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, tensor] : adapter_tensors(model)) {
    parameters[name] = tensor;  // a detached view of the parameter
    shapes[name] = tensor.sizes().vec();
  }
  at::NoGradGuard no_grad;
  read_adapter_weights(dir, shapes, [&](const std::string& name, const at::Tensor& whole) {
    parameters.at(name).copy_(whole);
  });
}

models::llama::LlamaForCausalLM load_llama_model(const std::string& dir,
                                                 const std::function<void(models::llama::LlamaConfig&)>& configure) {
  std::optional<AdapterConfig> adapter;
  std::string base = dir;
  if (is_lora_adapter(dir)) {
    adapter = read_adapter_config(dir);
    base = base_directory(*adapter, dir);
  }
  models::llama::LlamaConfig config = read_llama_config(base);
  if (configure) configure(config);
  config.validate();
  if (adapter && config.quantization != "none") {
    throw_input_error("{}: the adapter's base {} is a quantized bLLaMA (inference only); adapters go on its "
                      "full-precision checkpoint", dir, base);
  }
  models::llama::LlamaForCausalLM model(config, /*init_weights=*/false);
  load_llama_weights(*model, base);
  if (adapter) {
    model->add_lora(adapter->lora);
    load_adapter_weights(*model, dir);
  }
  model->eval();
  return model;
}

}  // namespace bpt::io
