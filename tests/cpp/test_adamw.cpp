// bpt::train::AdamW against libtorch's own torch::optim::AdamW, and its schedule by hand.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <torch/optim/adamw.h>

#include <cmath>
#include <map>

#include "csrc/common/error.h"
#include "csrc/train/adamw.h"
#include "helpers.h"

namespace {

using bpt::train::AdamW;
using bpt::train::AdamWOptions;

AdamWOptions constant_lr(double lr) {
  AdamWOptions o;
  o.lr = o.end_lr = lr;
  o.clip_gradient = 0;
  o.weight_decay = 0.1;
  return o;
}

std::vector<std::pair<std::string, at::Tensor>> make_params(at::ScalarType dtype = at::kFloat) {
  return {{"layers.0.mlp.up_proj.weight", at::randn({4, 3}).to(dtype).requires_grad_()},
          {"layers.0.input_layernorm.weight", at::randn({3}).to(dtype).requires_grad_()},
          {"embed_tokens.weight", at::randn({5, 3}).to(dtype).requires_grad_()}};
}

}  // namespace

TEST_CASE("learning rate: linear warm-up, then cosine or linear decay to end_lr", "[adamw]") {
  AdamWOptions o;
  o.lr = 1.0;
  o.end_lr = 0.1;
  o.lr_warmup_steps = 10;
  o.lr_decay_steps = 110;
  const auto lr = [&](int64_t step) { return bpt::train::learning_rate(o, step); };
  REQUIRE(lr(0) == 0.0);
  REQUIRE(lr(5) == Approx(0.5));
  REQUIRE(lr(10) == Approx(1.0));
  REQUIRE(lr(35) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI / 4))));
  REQUIRE(lr(60) == Approx(0.55));
  REQUIRE(lr(110) == Approx(0.1));
  REQUIRE(lr(1000) == Approx(0.1));
  o.lr_schedule = "linear";
  REQUIRE(lr(35) == Approx(0.1 + 0.9 * 0.75));
  o.lr_decay_steps = 0;  // no decay: the peak after the warm-up
  REQUIRE(lr(1000) == Approx(1.0));
  o.lr_decay_steps = 5;
  REQUIRE_THROWS_WITH(o.validate(), Catch::Contains("lr_decay_steps: 5 is shorter than lr_warmup_steps 10"));
}

TEST_CASE("weight decay skips norms, biases and embeddings unless asked", "[adamw]") {
  AdamWOptions o;
  REQUIRE(bpt::train::decays("model.layers.0.self_attn.q_proj.weight", {8, 8}, o));
  REQUIRE_FALSE(bpt::train::decays("model.norm.weight", {8}, o));
  REQUIRE_FALSE(bpt::train::decays("model.embed_tokens.weight", {8, 8}, o));
  o.decay_embeddings = true;
  REQUIRE(bpt::train::decays("model.embed_tokens.weight", {8, 8}, o));
}

TEST_CASE("AdamW updates match torch::optim::AdamW with the same decay groups", "[adamw]") {
  at::manual_seed(0);
  auto ours = make_params();
  std::vector<at::Tensor> reference_params;
  for (auto& [name, p] : ours) reference_params.push_back(p.detach().clone().requires_grad_());
  AdamW adamw(ours, constant_lr(0.01));
  // Group 0 decays (the matrix), group 1 does not (the norm and the embedding).
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<at::Tensor>{reference_params[0]},
                      std::make_unique<torch::optim::AdamWOptions>(
                          torch::optim::AdamWOptions(0.01).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1)));
  groups.emplace_back(std::vector<at::Tensor>{reference_params[1], reference_params[2]},
                      std::make_unique<torch::optim::AdamWOptions>(
                          torch::optim::AdamWOptions(0.01).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.0)));
  torch::optim::AdamW reference(groups);
  for (int step = 0; step < 5; ++step) {
    for (size_t i = 0; i < ours.size(); ++i) {
      const at::Tensor grad = at::randn(ours[i].second.sizes());
      ours[i].second.mutable_grad() = grad.clone();
      reference_params[i].mutable_grad() = grad.clone();
    }
    const auto report = adamw.step();
    reference.step();
    REQUIRE_FALSE(report.skipped);
    REQUIRE_FALSE(ours[0].second.grad().defined());  // zeroed for the next accumulation
  }
  REQUIRE(adamw.steps_done() == 5);
  for (size_t i = 0; i < ours.size(); ++i) bpt::test::require_close(ours[i].second, reference_params[i], 1e-6, 1e-7);
}

TEST_CASE("global-norm clipping scales every gradient by clip / norm", "[adamw]") {
  at::manual_seed(1);
  auto clipped = make_params();
  auto prescaled = make_params();
  for (size_t i = 0; i < clipped.size(); ++i) prescaled[i].second.detach().copy_(clipped[i].second);
  AdamWOptions o = constant_lr(0.1);
  o.clip_gradient = 1.0;
  AdamW with_clip(clipped, o);
  AdamW without(prescaled, constant_lr(0.1));
  std::vector<at::Tensor> grads;
  double squares = 0;
  for (auto& [name, p] : clipped) {
    grads.push_back(at::randn(p.sizes()) * 3);
    squares += grads.back().pow(2).sum().item<double>();
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    clipped[i].second.mutable_grad() = grads[i];
    prescaled[i].second.mutable_grad() = grads[i] / std::sqrt(squares);
  }
  REQUIRE(with_clip.step().grad_norm == Approx(std::sqrt(squares)));
  without.step();
  for (size_t i = 0; i < grads.size(); ++i) bpt::test::require_close(clipped[i].second, prescaled[i].second, 1e-6, 1e-7);
}

TEST_CASE("a step with a non-finite gradient is skipped and reported", "[adamw]") {
  auto params = make_params();
  const at::Tensor before = params[0].second.detach().clone();
  AdamW adamw(params, constant_lr(0.1));
  params[0].second.mutable_grad() = at::full({4, 3}, NAN);
  const auto report = adamw.step();
  REQUIRE(report.skipped);
  REQUIRE(adamw.steps_done() == 0);
  REQUIRE(at::equal(params[0].second, before));
  REQUIRE_FALSE(params[0].second.grad().defined());
}

TEST_CASE("bf16 parameters train on fp32 master weights", "[adamw]") {
  at::manual_seed(2);
  auto bf16 = make_params(at::kBFloat16);
  std::vector<std::pair<std::string, at::Tensor>> fp32;
  for (auto& [name, p] : bf16) fp32.emplace_back(name, p.detach().to(at::kFloat).requires_grad_());
  AdamW low(bf16, constant_lr(1e-3));
  AdamW high(fp32, constant_lr(1e-3));
  for (int step = 0; step < 20; ++step) {
    for (size_t i = 0; i < bf16.size(); ++i) {
      const at::Tensor grad = at::randn(bf16[i].second.sizes());
      bf16[i].second.mutable_grad() = grad.to(at::kBFloat16);
      fp32[i].second.mutable_grad() = grad.to(at::kBFloat16).to(at::kFloat);
    }
    low.step();
    high.step();
  }
  // Updates of 1e-3 are below bf16's resolution near 1: without master weights most would be
  // lost. The master follows the fp32 run exactly and the parameter is its rounding.
  for (const auto& [name, master] : low.state()) {
    if (!name.ends_with(".master")) continue;
    const std::string param = name.substr(0, name.size() - 7);
    for (size_t i = 0; i < fp32.size(); ++i) {
      if (fp32[i].first != param) continue;
      bpt::test::require_close(master, fp32[i].second, 1e-6, 1e-6);
      REQUIRE(at::equal(bf16[i].second, master.to(at::kBFloat16)));
    }
  }
}

TEST_CASE("optimizer state saved and loaded continues exactly", "[adamw]") {
  at::manual_seed(3);
  auto a = make_params();
  auto b = make_params();
  for (size_t i = 0; i < a.size(); ++i) b[i].second.detach().copy_(a[i].second);
  AdamW first(a, constant_lr(0.01));
  for (int step = 0; step < 3; ++step) {
    for (auto& [name, p] : a) p.mutable_grad() = at::ones(p.sizes());
    first.step();
  }
  std::map<std::string, at::Tensor> saved;
  for (const auto& [name, tensor] : first.state()) saved[name] = tensor.clone();
  for (size_t i = 0; i < a.size(); ++i) b[i].second.detach().copy_(a[i].second);
  AdamW second(b, constant_lr(0.01));
  second.load_state([&](const std::string& name) { return saved.at(name); });
  REQUIRE(second.steps_done() == 3);
  for (auto* params : {&a, &b}) {
    for (auto& [name, p] : *params) p.mutable_grad() = at::full(p.sizes(), 0.5);
  }
  first.step();
  second.step();
  for (size_t i = 0; i < a.size(); ++i) REQUIRE(at::equal(a[i].second, b[i].second));
}
