// bpt-train: trains a LLaMA on JSONL text (or synthetic tokens) with llamabpt's flags.
//
//   bpt-train --config configs/llama/tiny.toml --logger.output_dir runs/tiny --autoresume
//
// A thin main over bpt::train::Trainer: it builds the model, data and options from the flags
// and hands them over. `bpt-train --help` lists every flag with its default.

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>

#include <ATen/Context.h>
#include <nlohmann/json.hpp>

#include "apps/app.h"
#include "csrc/data/loader.h"
#include "csrc/data/tokenizer.h"
#include "csrc/io/flags.h"
#include "csrc/io/hf_checkpoint.h"
#include "csrc/io/lora_adapter.h"
#include "csrc/train/config.h"
#include "csrc/train/llama_module.h"
#include "csrc/train/trainer.h"

namespace {

using bpt::throw_input_error;
namespace fs = std::filesystem;

// --load_checkpoint split into its kind (params, trainstate, hf) and directory.
struct CheckpointSource {
  std::string kind, dir;
};

CheckpointSource parse_load_checkpoint(const std::string& flag) {
  if (flag.empty()) return {};
  const size_t sep = flag.find("::");
  CheckpointSource source{sep == std::string::npos ? "" : flag.substr(0, sep),
                          sep == std::string::npos ? "" : flag.substr(sep + 2)};
  if ((source.kind != "params" && source.kind != "trainstate" && source.kind != "hf") || source.dir.empty()) {
    throw_input_error("--load_checkpoint: expected params::DIR, trainstate::DIR or hf::DIR, got '{}'", flag);
  }
  return source;
}

// The directory holding the weights a run starts from: a LoRA checkpoint's base (named in its
// adapter_config.json) when resuming one with trainstate::, else the checkpoint itself.
std::string weights_dir(const CheckpointSource& checkpoint) {
  if (checkpoint.kind == "trainstate" && bpt::io::is_lora_adapter(checkpoint.dir)) {
    return bpt::io::adapter_base(checkpoint.dir);
  }
  return checkpoint.dir;
}

bpt::models::llama::LlamaConfig model_config(const bpt::train::TrainConfig& c, const std::string& weights) {
  const std::string source = !c.load_llama_config.empty() ? c.load_llama_config : weights.empty() ? "tiny" : weights;
  bpt::models::llama::LlamaConfig config =
      fs::is_directory(source) ? bpt::io::read_llama_config(source) : bpt::models::llama::preset(source);
  if (c.model != "llama" && c.model != "bllama" && c.model != "glam") {
    throw_input_error("--model: expected llama, bllama or glam, got '{}'", c.model);
  }
  if (c.model == "bllama") config.bitlinear = true;
  if (c.model == "glam" && fs::is_directory(source) && config.num_local_experts == 0) {
    throw_input_error("--model=glam: {} is a dense model; GLaM's experts would have no weights in it (start GLaM "
                      "from a preset, or load a GLaM or Mixtral checkpoint)", source);
  }
  if (c.model == "glam") bpt::models::llama::make_glam(config);  // before the overrides, which may change it
  try {
    config.update(c.update_llama_config);
  } catch (const bpt::InputError& e) {
    throw_input_error("--update_llama_config: {}", e.what());
  }
  for (const auto& [field, value] : c.llama_overrides) {
    try {
      config.set(field, value);
    } catch (const bpt::InputError& e) {
      throw_input_error("--llama.{}", e.what());
    }
  }
  config.dtype = bpt::models::llama::parse_dtype(c.dtype, "--dtype");
  if (config.quantization != "none") {
    throw_input_error("--load_llama_config: {} is a quantized bLLaMA (quantization = {}), which only runs inference; "
                      "train from its full-precision checkpoint", source, config.quantization);
  }
  config.validate();
  return config;
}

// --finetune.*: the adapters of a LoRA run, or nullopt for full training.
std::optional<bpt::models::llama::LoRAConfig> lora_config(const bpt::train::FinetuneConfig& f,
                                                          const CheckpointSource& checkpoint) {
  if (f.mode == "full") return std::nullopt;
  if (f.mode != "lora") throw_input_error("--finetune.mode: expected full or lora, got '{}'", f.mode);
  if (checkpoint.kind.empty()) {
    throw_input_error("--finetune.mode=lora: adapters train on a frozen base model; give it with "
                      "--load_checkpoint=hf::DIR (or params::DIR)");
  }
  if (f.lora_rank < 1) throw_input_error("--finetune.lora_rank: expected >= 1, got {}", f.lora_rank);
  if (!(f.lora_alpha > 0)) throw_input_error("--finetune.lora_alpha: expected > 0, got {}", f.lora_alpha);
  if (!(f.lora_dropout >= 0 && f.lora_dropout < 1)) {
    throw_input_error("--finetune.lora_dropout: expected a value in [0, 1), got {}", f.lora_dropout);
  }
  bpt::models::llama::LoRAConfig lora;
  lora.options.rank(f.lora_rank).alpha(f.lora_alpha).dropout(f.lora_dropout);
  lora.target_modules = bpt::models::llama::lora_target_modules(f.lora_target, "--finetune.lora_target");
  return lora;
}

// --device: the CPU, or this rank's GPU (LOCAL_RANK), which must exist.
at::Device training_device(const std::string& name, const bpt::dist::LaunchEnv& launch) {
  if (name == "cpu") return at::kCPU;
  if (name != "cuda") throw_input_error("--device: expected cpu or cuda, got '{}'", name);
  if (!at::hasCUDA()) {
    throw_input_error("--device cuda: no CUDA here (bpt and torch built for CUDA, make build-cuda, on a machine with "
                      "a GPU)");
  }
  const int64_t gpus = at::getNumGPUs();
  if (launch.local_rank >= gpus) {
    throw_input_error("--device cuda: LOCAL_RANK {} but this machine has {} GPU(s) (one rank per GPU)",
                      launch.local_rank, gpus);
  }
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(launch.local_rank));
}

std::unique_ptr<bpt::data::DataLoader> make_json_loader(const bpt::train::DatasetConfig& d, const std::string& flag,
                                                        const bpt::data::Tokenizer* tokenizer, uint64_t seed) {
  if (tokenizer == nullptr) throw_input_error("--tokenizer.vocab_file: required for a json {}", flag);
  const std::vector<std::string> paths = bpt::split(d.path, ',');
  if (paths.empty()) throw_input_error("--{}.json_dataset.path: required for a json dataset", flag);
  auto corpus = std::make_shared<bpt::data::JsonlCorpus>(paths);
  auto processor = std::make_shared<bpt::data::TextProcessor>(*tokenizer, d.fields, d.add_bos_token, d.add_eos_token);
  bpt::data::PackingOptions packing;
  packing.seq_length = d.seq_length;
  packing.batch_size = d.batch_size;
  packing.seed = seed;
  packing.shuffle = d.shuffle;
  packing.tokenizer_threads = d.tokenizer_processes;
  return std::make_unique<bpt::data::PackedLoader>(corpus, processor, packing);
}

std::unique_ptr<bpt::data::DataLoader> make_loader(const bpt::train::DatasetConfig& d, const std::string& flag,
                                                   const bpt::data::Tokenizer* tokenizer, int64_t vocab_size,
                                                   uint64_t seed) {
  if (d.type == "synthetic") {
    return std::make_unique<bpt::data::SyntheticLoader>(vocab_size, d.seq_length, d.batch_size, seed);
  }
  if (d.type != "json") throw_input_error("--{}.type: expected json or synthetic, got '{}'", flag, d.type);
  try {
    return make_json_loader(d, flag, tokenizer, seed);
  } catch (const bpt::InputError& e) {
    const std::string message = e.what();
    // Settings named without their dataset ("json_dataset.path: ...") get it in front.
    if (message.rfind("json_dataset.", 0) == 0 || message.rfind("text_processor.", 0) == 0) {
      throw_input_error("--{}.{}", flag, message);
    }
    throw;
  }
}

int train(int argc, char** argv) {
  bpt::train::TrainConfig config;
  bpt::io::FlagSet flags;
  std::string unused_config_path;
  flags.add("config", "a TOML file of these settings; flags given here override it", &unused_config_path);
  bpt::train::register_flags(config, flags);
  if (flags.parse(argc, argv)) {
    std::printf("Usage: bpt-train [--config FILE.toml] [--name=value ...]\n\n%s", flags.help().c_str());
    return 0;
  }

  const CheckpointSource checkpoint = parse_load_checkpoint(config.load_checkpoint);
  const std::string weights = weights_dir(checkpoint);
  const bpt::models::llama::LlamaConfig llama = model_config(config, weights);
  const std::optional<bpt::models::llama::LoRAConfig> lora = lora_config(config.finetune, checkpoint);
  if (config.dist_timeout_s < 1) throw_input_error("--dist_timeout: expected >= 1 second, got {}", config.dist_timeout_s);
  const bpt::dist::LaunchEnv launch = bpt::dist::launch_env();
  // The batch is global: each rank takes batch_size / ranks rows of it.
  for (const auto& [flag, dataset] : {std::pair{"train_dataset", &config.train_dataset},
                                      std::pair{"eval_dataset", &config.eval_dataset}}) {
    const bool used = dataset == &config.train_dataset || config.trainer.eval_freq > 0;
    if (used && dataset->batch_size % launch.world_size != 0) {
      throw_input_error("--{}.json_dataset.batch_size {} does not divide among {} data-parallel ranks (the batch is "
                        "global: each rank takes batch_size / ranks rows)", flag, dataset->batch_size,
                        launch.world_size);
    }
  }
  if (config.expert_parallel) {
    bpt::train::check_expert_parallel(llama, bpt::dist::parse_mesh_dim(config.mesh_dim, launch.world_size).fsdp);
  }
  const at::Device device = training_device(config.device, launch);
  const bpt::dist::Mesh mesh =
      bpt::dist::make_mesh(launch, config.mesh_dim, std::chrono::seconds(config.dist_timeout_s), config.device);
  std::unique_ptr<bpt::data::Tokenizer> tokenizer;
  if (!config.tokenizer_vocab_file.empty()) {
    tokenizer = std::make_unique<bpt::data::Tokenizer>(config.tokenizer_vocab_file);
    tokenizer->check_fits(llama.vocab_size);
  }
  const auto train_data = make_loader(config.train_dataset, "train_dataset", tokenizer.get(), llama.vocab_size,
                                      static_cast<uint64_t>(config.seed));
  std::unique_ptr<bpt::data::DataLoader> eval_data;
  if (config.trainer.eval_freq > 0) {
    eval_data = make_loader(config.eval_dataset, "eval_dataset", tokenizer.get(), llama.vocab_size,
                            static_cast<uint64_t>(config.seed) + 1);
  }

  // load_checkpoint: params::DIR or hf::DIR (weights), trainstate::DIR (everything; the
  // trainer loads it). A LoRA run's base weights always come from a directory.
  at::manual_seed(static_cast<uint64_t>(config.seed));
  const bool load_base = checkpoint.kind == "params" || checkpoint.kind == "hf" || lora.has_value();
  bpt::models::llama::LlamaForCausalLM model(llama, /*init_weights=*/checkpoint.kind.empty());
  if (load_base) bpt::io::load_llama_weights(*model, weights);
  if (lora) model->add_lora(*lora);
  bpt::train::LlamaModule module(model, bpt::train::parse_remat_policy(llama.remat_policy));
  module.tokenizer_file = config.tokenizer_vocab_file;
  if (lora) module.lora_base = fs::absolute(weights).lexically_normal().string();
  if (!device.is_cpu()) module.to(device);
  if (mesh.distributed()) module.shard(mesh, config.fsdp, config.expert_parallel);

  if (!config.load_dataset_state.empty()) {
    std::ifstream stream(config.load_dataset_state);
    if (!stream) throw_input_error("--load_dataset_state: cannot open {}", config.load_dataset_state);
    const nlohmann::json state = nlohmann::json::parse(stream, nullptr, /*allow_exceptions=*/false);
    if (!state.is_object() || !state.contains("dataset")) {
      throw_input_error("{}: expected a trainer_state.json with a \"dataset\" entry", config.load_dataset_state);
    }
    train_data->restore(state["dataset"]);
  }

  bpt::train::TrainerOptions options = config.trainer;
  options.resume_from = checkpoint.kind == "trainstate" ? checkpoint.dir : "";
  options.seq_length = config.train_dataset.seq_length;
  options.run_config = flags.values();
  for (const auto& [field, value] : config.llama_overrides) options.run_config.emplace_back("llama." + field, value);
  // For crash tests: hold each checkpoint half-written this long (documented in docs/training.md).
  if (const char* delay = std::getenv("BPT_CHECKPOINT_DELAY_MS")) options.save_delay_ms = std::atoll(delay);
  if (config.optimizer_type != "adamw") throw_input_error("--optimizer.type: only adamw, got '{}'", config.optimizer_type);

  bpt::train::Trainer trainer(options, config.adamw, mesh.world);
  const auto result = trainer.fit(module, *train_data, eval_data.get());
  if (mesh.rank() != 0) return 0;
  std::printf("bpt-train: %s at step %lld, loss %.4f%s; checkpoint in %s/checkpoint\n",
              result.interrupted ? "stopped" : "done", static_cast<long long>(result.steps), result.last_loss,
              result.skipped_steps ? fmt::format(", {} steps skipped", result.skipped_steps).c_str() : "",
              config.trainer.output_dir.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bpt::app::run("bpt-train", [&] { return train(argc, argv); });
}
