#include "csrc/train/llama_module.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <string_view>

#include "csrc/common/error.h"
#include "csrc/dist/expert_parallel.h"
#include "csrc/io/hf_checkpoint.h"
#include "csrc/io/lora_adapter.h"
#include "csrc/io/sharded_checkpoint.h"

namespace bpt::train {
namespace fs = std::filesystem;
using models::llama::LayerInputs;
using models::llama::LlamaDecoderLayerImpl;

// In the name of every expert parameter: model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight
constexpr std::string_view kExperts = ".block_sparse_moe.experts.";

LlamaModule::LlamaModule(models::llama::LlamaForCausalLM model_, RematPolicy remat)
    : model(std::move(model_)), remat_(remat) {
  apply_remat(*model->model, remat);
  for (const auto& item : model->named_parameters()) {
    if (item.key() == "model.embed_tokens.weight" || item.value().dim() != 2) continue;
    // A frozen weight (a LoRA base) runs forward and the input gradient: 4 FLOPs per weight
    // per token, not 6.
    double per_weight = item.value().requires_grad() ? 6.0 : 4.0;
    // An expert computes for the tokens routed to it: k of E experts per token.
    const auto& c = model->config;
    if (item.key().find(kExperts) != std::string::npos) {
      per_weight *= static_cast<double>(c.num_experts_per_tok) / static_cast<double>(c.num_local_experts);
    }
    flops_matmul_ += per_weight * static_cast<double>(item.value().numel());
  }
}

namespace {

// With expert parallelism, expert e of each MoE layer lives on rank expert_owner(e).
dist::ExpertPlacement place_experts(models::llama::LlamaForCausalLMImpl& model, const dist::Mesh& mesh,
                                    const std::shared_ptr<int64_t>& exchanged_bytes) {
  const int64_t E = model.config.num_local_experts;
  TORCH_CHECK(E > 0 && E % mesh.fsdp_group.size() == 0, "place_experts: ", E, " experts over ",
              mesh.fsdp_group.size(), " ranks (check_expert_parallel first)");
  for (const auto& layer : *model.model->layers) {
    auto& moe = layer->as<LlamaDecoderLayerImpl>()->block_sparse_moe;
    if (moe) moe->compute_experts = dist::expert_parallel(mesh.fsdp_group, exchanged_bytes);
  }
  return [E, group = mesh.fsdp_group](const std::string& name) -> int64_t {
    const size_t at = name.find(kExperts);
    if (at == std::string::npos) return -1;
    return dist::expert_owner(std::stoll(name.substr(at + kExperts.size())), E, group);
  };
}

}  // namespace

void check_expert_parallel(const models::llama::LlamaConfig& config, int64_t fsdp) {
  const int64_t E = config.num_local_experts;
  if (E == 0) throw_input_error("--expert_parallel: the model has no MoE layers (num_local_experts is 0)");
  if (E % fsdp != 0) {
    throw_input_error("--expert_parallel: {} experts (num_local_experts) do not divide over the {} ranks of the fsdp "
                      "group (--mesh_dim)", E, fsdp);
  }
}

void LlamaModule::shard(const dist::Mesh& mesh, dist::FsdpOptions options, bool expert_parallel) {
  // Unit 0 (the root): everything outside the decoder layers; unit i + 1: layer i.
  std::vector<dist::NamedParameters> units(1 + model->config.num_hidden_layers);
  const std::string layers = "model.layers.";
  for (const auto& item : model->named_parameters()) {
    size_t unit = 0;
    if (item.key().rfind(layers, 0) == 0) unit = 1 + std::stoul(item.key().substr(layers.size()));
    units[unit].emplace_back(item.key(), item.value());
  }
  // One fsdp rank holds every expert anyway (plain data parallelism): nothing to place.
  const dist::ExpertPlacement placement =
      expert_parallel && mesh.fsdp > 1 ? place_experts(*model, mesh, exchanged_bytes_) : nullptr;
  fsdp_ = std::make_unique<dist::Fsdp>(mesh, std::move(units), options, placement);
  sharding_.shapes = fsdp_->shapes();
  sharding_.sum_squares = [fsdp = fsdp_.get()](double local) { return fsdp->sum_over_shards(local); };
  const bool recompute = remat_ != RematPolicy::EverythingSaveable;
  model->model->run_layer = [fsdp = fsdp_.get(), recompute](LlamaDecoderLayerImpl& layer, const at::Tensor& h,
                                                            const LayerInputs& inputs) {
    const nn::TensorFn fn = [&layer, inputs](const std::vector<at::Tensor>& x) {
      return layer.forward(x[0], inputs).tensors();
    };
    return models::llama::LayerOutput::from(fsdp->run(static_cast<size_t>(layer.index) + 1, fn, {h}, recompute));
  };
}

void LlamaModule::to(at::Device device) {
  TORCH_CHECK(!fsdp_, "LlamaModule::to: move the model before shard()");
  model->to(device);
  device_ = device;
}

StepOutput LlamaModule::training_step(const data::Batch& batch) {
  if (fsdp_) fsdp_->gather_root();
  const auto here = [this](const at::Tensor& t) { return t.defined() ? t.to(device_) : t; };
  const nn::LMLoss out = model->forward(here(batch.input_ids), here(batch.targets), here(batch.segment_ids));
  StepOutput step{out.loss, out.n_tokens.item<int64_t>(), out.n_correct.item<int64_t>(), {}};
  if (model->config.num_local_experts > 0) {
    const nn::RouterStats stats = model->router_stats();
    step.metrics = {{"router_aux_loss", stats.aux_loss},
                    {"router_z_loss", stats.z_loss},
                    {"router_dropped_fraction", stats.dropped_fraction}};
  }
  return step;
}

std::optional<StepOutput> LlamaModule::validation_step(const data::Batch& batch) {
  at::NoGradGuard no_grad;
  // Evaluation mode for the step: no LoRA dropout, and no draw from the training's generator.
  struct EvalMode {
    explicit EvalMode(torch::nn::Module& m) : module(m) { module.eval(); }
    ~EvalMode() { module.train(); }
    torch::nn::Module& module;
  } eval_mode(*model);
  StepOutput out = training_step(batch);
  if (fsdp_) fsdp_->release();
  return out;
}

void LlamaModule::finish_backward() {
  if (fsdp_) fsdp_->finish_backward();
}

std::vector<std::pair<std::string, at::Tensor>> LlamaModule::named_parameters() {
  if (fsdp_) return fsdp_->pieces();
  std::vector<std::pair<std::string, at::Tensor>> result;
  for (const auto& item : model->named_parameters()) {
    if (item.value().requires_grad()) result.emplace_back(item.key(), item.value());  // not a frozen LoRA base
  }
  return result;
}

int64_t LlamaModule::held_bytes() {
  if (fsdp_) return fsdp_->held_bytes();
  int64_t bytes = 0;
  for (const at::Tensor& parameter : model->parameters()) {
    bytes += parameter.nbytes() * (parameter.requires_grad() ? 2 : 1);  // and a gradient if it trains
  }
  return bytes;
}

void LlamaModule::save(const std::string& dir) const {
  if (model->lora) {
    // An adapter directory: the adapters whole (gathered from the shards under FSDP).
    const io::NamedTensors tensors = fsdp_ ? fsdp_->gather_trainable() : io::adapter_tensors(*model);
    if (!fsdp_ || fsdp_->mesh().rank() == 0) io::write_adapter({*model->lora, lora_base}, tensors, dir);
  } else if (fsdp_) {
    fsdp_->write_pieces(dir, "model", fsdp_->pieces());
    fsdp_->write_index(dir, {"model"});
    if (fsdp_->mesh().rank() == 0) io::write_llama_config(model->config, dir);
  } else {
    io::write_llama(*model, dir);
  }
  if (!tokenizer_file.empty() && (!fsdp_ || fsdp_->mesh().rank() == 0)) {
    fs::copy_file(tokenizer_file, fs::path(dir) / "tokenizer.model", fs::copy_options::overwrite_existing);
  }
}

void LlamaModule::load(const std::string& dir) {
  if (model->lora) {
    if (!io::is_lora_adapter(dir)) {
      throw_input_error("{}: not a LoRA adapter directory (no adapter_config.json), which a LoRA run resumes from",
                        dir);
    }
    io::check_same_adapters(io::read_adapter_config(dir), *model->lora, dir);
    if (!fsdp_) return io::load_adapter_weights(*model, dir);
    io::read_adapter_weights(dir, fsdp_->shapes(), [&](const std::string& name, const at::Tensor& whole) {
      TORCH_CHECK(fsdp_->assign(name, whole), "LlamaModule::load: no sharded parameter ", name);
    });
    return;
  }
  if (io::is_lora_adapter(dir)) {
    throw_input_error("{}: a LoRA adapter checkpoint; continue it with --finetune.mode=lora and its base in "
                      "--load_checkpoint", dir);
  }
  if (!fsdp_) {
    io::load_llama_weights(*model, dir);
    return;
  }
  const auto checkpoint = io::open_weights(dir);
  io::read_llama_weights(model->config, *checkpoint, dir,
                         [&](const std::string& name, const at::Tensor& whole) {
                           TORCH_CHECK(fsdp_->assign(name, whole), "LlamaModule::load: no sharded parameter ", name);
                         });
}

void LlamaModule::save_optimizer(const std::string& dir, const AdamW& optimizer) const {
  if (!fsdp_) return TrainModule::save_optimizer(dir, optimizer);
  fsdp_->write_pieces(dir, "optimizer", optimizer.state());
  // A LoRA checkpoint keeps its adapters whole (save()): only the optimizer state is in pieces.
  fsdp_->write_index(dir, model->lora ? std::vector<std::string>{"optimizer"}
                                      : std::vector<std::string>{"model", "optimizer"});
}

bool LlamaModule::load_optimizer(const std::string& dir, AdamW& optimizer) {
  if (!fsdp_) return TrainModule::load_optimizer(dir, optimizer);
  const auto state = io::open_optimizer_state(dir);
  if (!state) return false;
  optimizer.load_state([&](const std::string& name) { return fsdp_->piece_of(name, state->tensor(name)); });
  return true;
}

double LlamaModule::flops_per_token(int64_t seq_length) const {
  const auto& c = model->config;
  double matmul = flops_matmul_;
  if (c.tie_word_embeddings) {  // the head, through the embedding table
    matmul += (model->lm_head->weight.requires_grad() ? 6.0 : 4.0) * static_cast<double>(c.vocab_size * c.hidden_size);
  }
  return matmul + 12.0 * c.num_hidden_layers * c.num_attention_heads * c.resolved_head_dim() * seq_length;
}

}  // namespace bpt::train
