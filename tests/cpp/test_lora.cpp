// nn::LoRALinear: a fresh adapter changes nothing; only the adapter learns; the output is the
// base plus (alpha / r) B A x, which merging into the base weight reproduces; and LLaMA with
// adapters on its projections.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>

#include "csrc/nn/bit_linear.h"
#include "csrc/nn/lora_linear.h"
#include "helpers.h"
#include "csrc/train/llama_module.h"
#include "models/llama/llama.h"

using bpt::nn::LoRALinear;
using bpt::nn::LoRAOptions;

TEST_CASE("LoRALinear: base + (alpha / r) B A x, only the adapter trains, names as peft's", "[lora]") {
  at::manual_seed(0);
  torch::nn::Linear base(torch::nn::LinearOptions(24, 10).bias(false));
  const at::Tensor base_weight = base->weight.detach().clone();
  LoRALinear lora(torch::nn::AnyModule(base), 24, 10, LoRAOptions().rank(4).alpha(8));
  std::vector<std::string> names;
  for (const auto& item : lora->named_parameters()) names.push_back(item.key());
  CHECK((names == std::vector<std::string>{"weight", "lora_A.weight", "lora_B.weight"}));

  const at::Tensor x = at::randn({3, 7, 24});
  bpt::test::require_close(lora(x), at::matmul(x, base_weight.t()), 0, 0);  // B starts at zero
  {
    at::NoGradGuard no_grad;
    lora->lora_B->weight.normal_();
  }
  const at::Tensor want = at::matmul(x, (base_weight + 2.0 * at::mm(lora->lora_B->weight, lora->lora_A->weight)).t());
  bpt::test::require_close(lora(x), want, 1e-5, 1e-5);
  bpt::test::require_close(lora->delta_weight(), 2.0 * at::mm(lora->lora_B->weight, lora->lora_A->weight), 0, 0);

  lora(x).sum().backward();
  CHECK(!base->weight.requires_grad());
  CHECK(!base->weight.grad().defined());
  CHECK(lora->lora_A->weight.grad().defined());
  CHECK(lora->lora_B->weight.grad().defined());
}

TEST_CASE("LoRALinear over a BitLinear keeps the base's norm and weight names, frozen", "[lora]") {
  at::manual_seed(1);
  bpt::nn::BitLinear base(bpt::nn::BitLinearOptions(16, 8));
  LoRALinear lora(torch::nn::AnyModule(base), 16, 8, LoRAOptions().rank(2));
  std::vector<std::string> trainable, frozen;
  for (const auto& item : lora->named_parameters()) {
    (item.value().requires_grad() ? trainable : frozen).push_back(item.key());
  }
  CHECK((frozen == std::vector<std::string>{"weight", "norm.weight"}));
  CHECK((trainable == std::vector<std::string>{"lora_A.weight", "lora_B.weight"}));
  const at::Tensor x = at::randn({5, 16});
  bpt::test::require_close(lora(x), base(x), 0, 0);
  CHECK_THROWS_WITH(LoRALinear(torch::nn::AnyModule(base), 16, 8, LoRAOptions().rank(0)),
                    Catch::Contains("rank must be positive"));
}

namespace {

bpt::models::llama::LlamaConfig tiny_llama(bool bitlinear) {
  bpt::models::llama::LlamaConfig config = bpt::models::llama::preset("tiny");
  config.update("hidden_size=32,intermediate_size=48,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,"
                "vocab_size=64,q_chunk_size=8,k_chunk_size=8,ffn_chunk_size=8,loss_chunk_size=16");
  config.bitlinear = bitlinear;
  return config;
}

}  // namespace

TEST_CASE("LLaMA with LoRA: only adapters train, under peft's names; merging reproduces the adapted model",
          "[lora][llama]") {
  at::manual_seed(2);
  bpt::models::llama::LlamaForCausalLM model(tiny_llama(false));
  const at::Tensor ids = at::randint(64, {2, 11});
  const at::Tensor before = model->logits(ids).detach();
  bpt::models::llama::LoRAConfig lora{LoRAOptions().rank(4).alpha(8),
                                      bpt::models::llama::lora_target_modules("all", "--finetune.lora_target")};
  model->add_lora(lora);
  // B = 0: the same model (the MLP now runs through its layers instead of the chunked op).
  bpt::test::require_close(model->logits(ids), before, 1e-5, 1e-5);

  std::vector<std::string> trainable;
  for (const auto& item : model->named_parameters()) {
    if (item.value().requires_grad()) trainable.push_back(item.key());
  }
  REQUIRE(trainable.size() == 2 * 7 * 2);  // layers x projections x (A, B)
  CHECK(trainable.front() == "model.layers.0.self_attn.q_proj.lora_A.weight");
  CHECK(trainable.back() == "model.layers.1.mlp.down_proj.lora_B.weight");
  CHECK(model->named_parameters().contains("model.layers.1.mlp.down_proj.weight"));  // the base keeps its name

  {
    at::NoGradGuard no_grad;
    for (const std::string& name : trainable) {
      if (name.ends_with("lora_B.weight")) model->named_parameters()[name].normal_(0, 0.5);
    }
  }
  const at::Tensor targets = at::randint(64, {2, 11});
  model->forward(ids, targets).loss.backward();
  for (const auto& item : model->named_parameters()) {
    INFO(item.key());
    CHECK(item.value().grad().defined() == item.value().requires_grad());
  }
  const at::Tensor adapted = model->logits(ids).detach();
  CHECK(bpt::test::max_abs_diff(adapted, before) > 1e-2);
  model->merge_lora();
  CHECK(!model->lora);
  const bpt::models::llama::LlamaForCausalLM plain(tiny_llama(false));
  CHECK(model->named_parameters().keys() == plain->named_parameters().keys());
  bpt::test::require_close(model->logits(ids), adapted, 1e-4, 1e-5);
}

TEST_CASE("LoRA targets: all, attention, mlp or projection names; a bLLaMA's adapters do not merge", "[lora][llama]") {
  using bpt::models::llama::lora_target_modules;
  CHECK(lora_target_modules("attention", "f").size() == 4);
  CHECK((lora_target_modules("mlp", "f") == std::vector<std::string>{"gate_proj", "up_proj", "down_proj"}));
  CHECK((lora_target_modules("q_proj,v_proj", "f") == std::vector<std::string>{"q_proj", "v_proj"}));
  CHECK_THROWS_WITH(lora_target_modules("q_proj,wq", "--finetune.lora_target"),
                    Catch::Contains("--finetune.lora_target: 'wq' is not a LLaMA projection"));

  at::manual_seed(3);
  bpt::models::llama::LlamaForCausalLM model(tiny_llama(true));
  const at::Tensor ids = at::randint(64, {1, 9});
  const at::Tensor before = model->logits(ids).detach();
  model->add_lora({LoRAOptions().rank(2), lora_target_modules("q_proj,down_proj", "f")});
  bpt::test::require_close(model->logits(ids), before, 0, 0);
  int64_t adapters = 0;
  for (const auto& item : model->named_parameters()) adapters += item.value().requires_grad();
  CHECK(adapters == 2 * 2 * 2);
  CHECK_THROWS_WITH(model->merge_lora(), Catch::Contains("a bLLaMA's adapters cannot be merged"));
}

TEST_CASE("validation runs without LoRA dropout and leaves the model training", "[lora][train]") {
  at::manual_seed(4);
  bpt::models::llama::LlamaForCausalLM model(tiny_llama(false));
  model->add_lora({LoRAOptions().rank(4).dropout(0.5), bpt::models::llama::lora_target_modules("all", "f")});
  {
    at::NoGradGuard no_grad;
    for (auto& item : model->named_parameters()) {
      if (item.key().ends_with("lora_B.weight")) item.value().normal_(0, 0.5);
    }
  }
  bpt::train::LlamaModule module(model, bpt::train::RematPolicy::NothingSaveable);
  const bpt::data::Batch batch{at::randint(64, {2, 12}), at::randint(64, {2, 12}), at::zeros({2, 12}, at::kLong)};
  const double first = module.validation_step(batch)->loss.item<double>();
  CHECK(model->is_training());
  CHECK(module.validation_step(batch)->loss.item<double>() == first);  // no dropout mask drawn
  model->eval();
  CHECK(model->forward(batch.input_ids, batch.targets, batch.segment_ids).loss.item<double>() == first);
  model->train();
  CHECK(model->forward(batch.input_ids, batch.targets, batch.segment_ids).loss.item<double>() != first);
}
