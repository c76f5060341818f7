// Rematerialisation: the same gradients under every policy, and the random state replayed.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <string_view>

#include "csrc/nn/checkpoint.h"
#include "csrc/train/remat.h"
#include "helpers.h"
#include "models/llama/llama.h"

namespace {

using bpt::train::RematPolicy;

std::vector<at::Tensor> llama_grads(RematPolicy policy) {
  auto config = bpt::models::llama::preset("tiny");
  config.q_chunk_size = config.k_chunk_size = 8;
  at::manual_seed(0);
  bpt::models::llama::LlamaForCausalLM model(config);
  bpt::train::apply_remat(*model->model, policy);
  const at::Tensor ids = at::randint(0, 256, {2, 20}, at::kLong);
  const at::Tensor segments = at::cat({at::ones({2, 12}, at::kLong), at::full({2, 8}, 2, at::kLong)}, 1);
  model->forward(ids, ids.roll(-1, 1), segments).loss.backward();
  std::vector<at::Tensor> grads;
  for (const at::Tensor& p : model->parameters()) grads.push_back(p.grad().clone());
  return grads;
}

}  // namespace

TEST_CASE("every remat policy gives the same gradients", "[remat]") {
  const auto reference = llama_grads(RematPolicy::EverythingSaveable);
  for (const auto policy : {RematPolicy::NothingSaveable, RematPolicy::CheckpointDots}) {
    const auto grads = llama_grads(policy);
    REQUIRE(grads.size() == reference.size());
    for (size_t i = 0; i < grads.size(); ++i) bpt::test::require_close(grads[i], reference[i], 1e-6, 1e-7);
  }
}

TEST_CASE("checkpoint recomputes with the random state of the forward pass", "[remat]") {
  const at::Tensor x = at::randn({64}).requires_grad_();
  // Dropout-like: a random mask drawn inside fn must be the same mask in the recomputation.
  const bpt::nn::TensorFn fn = [](const std::vector<at::Tensor>& in) {
    return std::vector<at::Tensor>{in[0] * (at::rand({64}) > 0.5).to(at::kFloat)};
  };
  at::manual_seed(7);
  const at::Tensor y = bpt::nn::checkpoint(fn, {x})[0];
  at::rand({5});  // the random state moves on before backward
  y.sum().backward();
  // dy/dx is the mask itself, and y shows which mask the forward drew (x is never 0).
  REQUIRE(at::equal(x.grad(), (y != 0).to(at::kFloat)));
  REQUIRE(bpt::train::parse_remat_policy("checkpoint_dots") == RematPolicy::CheckpointDots);
  REQUIRE_THROWS_WITH(bpt::train::parse_remat_policy("dots"), Catch::Contains("llama.remat_policy"));
}

TEST_CASE("checkpoint hooks run around the forward and around the recomputation and its backward", "[remat]") {
  const at::Tensor w = at::randn({8}).requires_grad_();
  std::vector<std::string_view> events;  // literals only
  const bpt::nn::TensorFn fn = [&](const std::vector<at::Tensor>& in) {
    events.push_back(at::GradMode::is_enabled() ? "fn with grad" : "fn");
    return std::vector<at::Tensor>{(in[0] * w).sin()};
  };
  bpt::nn::CheckpointHooks hooks;
  hooks.before_forward = [&] { events.push_back("before_forward"); };
  hooks.after_forward = [&] { events.push_back("after_forward"); };
  hooks.before_recompute = [&] { events.push_back("before_recompute"); };
  // By the time after_backward runs, the parameters inside fn have their gradients.
  bool grad_set_by_then = false;
  hooks.after_backward = [&] {
    events.push_back("after_backward");
    grad_set_by_then = w.grad().defined();
  };
  const at::Tensor x = at::randn({8}).requires_grad_();
  bpt::nn::checkpoint(fn, {x}, hooks)[0].sum().backward();
  const std::vector<std::string_view> with_grad = {"before_forward", "fn", "after_forward", "before_recompute",
                                              "fn with grad", "after_backward"};
  CHECK(events == with_grad);
  CHECK(grad_set_by_then);
  bpt::test::require_close(x.grad(), (x * w).cos() * w, 1e-6, 1e-7);

  events.clear();  // without grad: fn between the forward hooks only
  {
    at::NoGradGuard no_grad;
    bpt::nn::checkpoint(fn, {x}, hooks);
  }
  const std::vector<std::string_view> without_grad = {"before_forward", "fn", "after_forward"};
  CHECK(events == without_grad);
}
