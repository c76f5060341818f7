// MoE routing against a naive per-token reference: top-k choices, GShard's capacity (first
// choices first, token order within a choice), which slots drop, the renormalised weights, and
// the aux and z losses by hand; and the layer against a per-token loop over its experts.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <cmath>
#include <map>

#include "csrc/nn/moe.h"
#include "helpers.h"

using bpt::nn::route;

TEST_CASE("routing: top-k, capacity by choice then token, weights and losses by hand", "[moe]") {
  at::manual_seed(0);
  const int64_t N = 13, E = 4, k = 2;
  const at::Tensor logits = at::randn({N, E}) * 2;
  for (const int64_t capacity : {int64_t{-1}, int64_t{3}, int64_t{5}}) {
    const bpt::nn::Routing r = route(logits, k, capacity);
    // The reference: a loop over choices, then tokens, filling each expert's queue.
    const at::Tensor probs = at::softmax(logits.to(at::kDouble), -1);
    const auto [top_p, top_e] = probs.topk(k, -1);
    std::map<int64_t, std::vector<std::pair<int64_t, double>>> queues;  // expert -> (token, weight)
    int64_t kept = 0;
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t n = 0; n < N; ++n) {
        const int64_t e = top_e[n][j].item<int64_t>();
        if (capacity >= 0 && static_cast<int64_t>(queues[e].size()) >= capacity) continue;
        queues[e].push_back({n, top_p[n][j].item<double>() / top_p[n].sum().item<double>()});
        ++kept;
      }
    }
    REQUIRE(r.token.size(0) == kept);
    int64_t slot = 0;
    for (int64_t e = 0; e < E; ++e) {
      REQUIRE(r.counts[static_cast<size_t>(e)] == static_cast<int64_t>(queues[e].size()));
      for (const auto& [token, weight] : queues[e]) {
        CHECK(r.token[slot].item<int64_t>() == token);
        CHECK(r.weight[slot].item<double>() == Approx(weight).epsilon(1e-5));
        ++slot;
      }
    }
    CHECK(r.dropped_fraction == Approx(1.0 - static_cast<double>(kept) / (k * N)));
    // aux = E sum_e (tokens choosing e / N) (mean probability of e); z = mean logsumexp^2.
    double aux = 0;
    for (int64_t e = 0; e < E; ++e) {
      aux += (top_e == e).sum().item<double>() / N * probs.select(1, e).mean().item<double>();
    }
    CHECK(r.aux_loss.item<double>() == Approx(E * aux).epsilon(1e-5));
    CHECK(r.z_loss.item<double>() == Approx(at::logsumexp(logits.to(at::kDouble), {1}).pow(2).mean().item<double>())
                                         .epsilon(1e-5));
  }
}

TEST_CASE("an MoE layer equals a per-token loop over its chosen experts; dropped tokens get zero", "[moe]") {
  at::manual_seed(1);
  for (const char* activation : {"silu", "gelu"}) {
    bpt::nn::MoELayer layer(bpt::nn::MoEOptions(8, 12, 4).top_k(2).capacity_factor(0.5).activation(activation));
    const at::Tensor x = at::randn({2, 5, 8}, at::kDouble);
    layer->to(at::kDouble);
    const auto [out, routing] = layer(x);
    const at::Tensor tokens = x.reshape({-1, 8});
    at::Tensor want = at::zeros_like(tokens);
    for (int64_t m = 0; m < routing.token.size(0); ++m) {
      const int64_t n = routing.token[m].item<int64_t>();
      int64_t e = 0, seen = routing.counts[0];
      while (m >= seen) seen += routing.counts[static_cast<size_t>(++e)];
      want[n] += routing.weight[m].item<double>() * layer->experts[e]->as<bpt::nn::MoEExpert>()->forward(
                                                          tokens[n].unsqueeze(0))[0];
    }
    bpt::test::require_close(out.reshape({-1, 8}), want, 1e-6, 1e-6);
    CHECK(routing.dropped_fraction > 0);  // capacity 0.5 x the even share drops some
    out.sum().backward();
    CHECK(layer->gate->weight.grad().defined());  // through the router weights
  }
}

TEST_CASE("experts chunked over tokens compute and differentiate as unchunked ones", "[moe]") {
  at::manual_seed(2);
  for (const char* activation : {"silu", "gelu"}) {
    bpt::nn::MoEExpert whole(8, 12, activation, -1), chunked(8, 12, activation, 3);
    whole->to(at::kDouble);
    chunked->to(at::kDouble);
    for (const auto& item : whole->named_parameters()) {
      at::NoGradGuard no_grad;
      chunked->named_parameters()[item.key()].copy_(item.value());
    }
    const at::Tensor x = at::randn({10, 8}, at::kDouble);  // 3 + 3 + 3 + 1 rows
    const at::Tensor x1 = x.clone().requires_grad_(), x2 = x.clone().requires_grad_();
    const at::Tensor y1 = whole(x1), y2 = chunked(x2);
    bpt::test::require_close(y2, y1, 1e-12, 1e-12);
    const at::Tensor g = at::randn_like(y1);
    y1.backward(g);
    y2.backward(g);
    bpt::test::require_close(x2.grad(), x1.grad(), 1e-12, 1e-12);
    for (const auto& item : whole->named_parameters()) {
      bpt::test::require_close(chunked->named_parameters()[item.key()].grad(), item.value().grad(), 1e-12, 1e-12);
    }
  }
}
