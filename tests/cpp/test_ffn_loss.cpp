// bpt::blockwise_ffn and bpt::chunked_lm_loss from C++, and their modules.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include "csrc/nn/blockwise_feed_forward.h"
#include "csrc/nn/chunked_lm_head_loss.h"
#include "csrc/ops/ops.h"
#include "tests/cpp/helpers.h"

TEST_CASE("blockwise ffn equals the unchunked SwiGLU for every chunk size, with gradients", "[ffn]") {
  at::manual_seed(0);
  const at::Tensor x = at::randn({13, 8}, at::kDouble).requires_grad_();
  const at::Tensor wg = at::randn({20, 8}, at::kDouble).requires_grad_();
  const at::Tensor wu = at::randn({20, 8}, at::kDouble).requires_grad_();
  const at::Tensor wd = at::randn({8, 20}, at::kDouble).requires_grad_();
  const at::Tensor ref = at::mm(at::silu(at::mm(x, wg.t())) * at::mm(x, wu.t()), wd.t());
  const at::Tensor g = at::randn_like(ref);
  const auto want = bpt::test::grads(ref, g, {x, wg, wu, wd});
  for (int64_t chunk : {-1, 1, 4, 13, 64}) {
    INFO("chunk " << chunk);
    const at::Tensor y = bpt::ops::blockwise_ffn(x, wg, wu, wd, chunk);
    bpt::test::require_close(y, ref, 1e-12, 1e-12);
    const auto got = bpt::test::grads(y, g, {x, wg, wu, wd});
    for (size_t i = 0; i < got.size(); ++i) bpt::test::require_close(got[i], want[i], 1e-10, 1e-10);
  }
}

TEST_CASE("BlockwiseFeedForward has Hugging Face's submodule names and matches its Linear layers", "[ffn][nn]") {
  bpt::nn::BlockwiseFeedForward mlp(bpt::nn::BlockwiseFeedForwardOptions(16, 40).chunk(5));
  const auto params = mlp->named_parameters();
  for (const char* name : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}) REQUIRE(params.contains(name));
  REQUIRE(params.size() == 3);
  const at::Tensor x = at::randn({2, 9, 16});
  const at::Tensor ref = mlp->down_proj(at::silu(mlp->gate_proj(x)) * mlp->up_proj(x));
  bpt::test::require_close(mlp(x), ref, 1e-5, 1e-5);
}

TEST_CASE("chunked lm loss equals cross entropy over full logits and skips ignore_index", "[loss]") {
  at::manual_seed(1);
  const at::Tensor h = at::randn({3, 7, 16}, at::kDouble).requires_grad_();
  const at::Tensor w = at::randn({40, 16}, at::kDouble).requires_grad_();
  at::Tensor targets = at::randint(0, 40, {3, 7}, at::kLong);
  targets.select(0, 2).narrow(0, 4, 3).fill_(-100);
  const at::Tensor logits = at::matmul(h, w.t()).reshape({-1, 40});
  const at::Tensor ref = at::cross_entropy_loss(logits, targets.reshape({-1}));
  const auto want = torch::autograd::grad({ref}, {h, w});
  for (int64_t chunk : {-1, 2, 5}) {
    INFO("chunk " << chunk);
    auto [loss, n_tokens, n_correct] = bpt::ops::chunked_lm_loss(h, w, targets, chunk);
    bpt::test::require_close(loss, ref, 1e-12, 1e-12);
    REQUIRE(n_tokens.item<int64_t>() == 18);
    const auto got = torch::autograd::grad({loss}, {h, w});
    for (size_t i = 0; i < 2; ++i) bpt::test::require_close(got[i], want[i], 1e-10, 1e-12);
  }
}

TEST_CASE("ChunkedLMHeadLoss trains its weight and its logits agree with the loss", "[loss][nn]") {
  bpt::nn::ChunkedLMHeadLoss head(bpt::nn::ChunkedLMHeadLossOptions(8, 30).chunk(4));
  const at::Tensor h = at::randn({2, 5, 8});
  const at::Tensor targets = at::randint(0, 30, {2, 5}, at::kLong);
  const bpt::nn::LMLoss out = head(h, targets);
  const at::Tensor ref = at::cross_entropy_loss(head->logits(h).reshape({-1, 30}), targets.reshape({-1}));
  bpt::test::require_close(out.loss, ref, 1e-5, 1e-5);
  out.loss.backward();
  REQUIRE(head->weight.grad().defined());
  REQUIRE(head->weight.grad().abs().sum().item<double>() > 0);
}
