// bpt::blockwise_attention through the dispatcher from C++, against naive fp64 attention.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <cmath>

#include "csrc/nn/blockwise_attention.h"
#include "csrc/ops/ops.h"
#include "tests/cpp/helpers.h"

namespace {

// Materialises the [T, S] scores and mask. q [B, Hq, T, D], k/v [B, Hkv, S, D].
std::pair<at::Tensor, at::Tensor> naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  bool causal, const at::Tensor& segment_ids, int64_t kv_offset) {
  const int64_t T = q.size(2), S = k.size(2), group = q.size(1) / k.size(1);
  const at::Tensor kk = k.to(at::kDouble).repeat_interleave(group, 1);
  const at::Tensor vv = v.to(at::kDouble).repeat_interleave(group, 1);
  at::Tensor scores = at::matmul(q.to(at::kDouble), kk.transpose(-1, -2)) / std::sqrt(double(q.size(3)));
  const at::Tensor q_pos = at::arange(T, at::kLong) + kv_offset, k_pos = at::arange(S, at::kLong);
  at::Tensor visible = at::ones({q.size(0), 1, T, S}, at::kBool);
  if (causal) visible = visible & (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1));
  if (segment_ids.defined()) {
    const at::Tensor q_seg = segment_ids.index_select(1, q_pos);
    visible = visible & (q_seg.unsqueeze(2) == segment_ids.unsqueeze(1)).unsqueeze(1);
  }
  scores = scores.masked_fill(visible.logical_not(), -INFINITY);
  return {at::matmul(at::softmax(scores, -1), vv), at::logsumexp(scores, -1)};
}

}  // namespace

TEST_CASE("blockwise attention matches naive attention with GQA, segments and ragged chunks", "[attention]") {
  at::manual_seed(0);
  const int64_t B = 2, Hq = 4, Hkv = 2, T = 29, D = 32;
  const at::Tensor q = at::randn({B, Hq, T, D}, at::kDouble).requires_grad_();
  const at::Tensor k = at::randn({B, Hkv, T, D}, at::kDouble).requires_grad_();
  const at::Tensor v = at::randn({B, Hkv, T, D}, at::kDouble).requires_grad_();
  const at::Tensor seg = at::cat({at::zeros({B, 11}, at::kLong), at::ones({B, T - 11}, at::kLong)}, 1);
  for (bool causal : {true, false}) {
    for (const at::Tensor& segments : {at::Tensor(), seg}) {
      INFO("causal " << causal << ", segments " << segments.defined());
      auto [out, lse] = bpt::ops::blockwise_attention(q, k, v, causal, 8, 6,
                                                      segments.defined() ? std::optional(segments) : std::nullopt);
      auto [ref_out, ref_lse] = naive_attention(q, k, v, causal, segments, 0);
      bpt::test::require_close(out, ref_out, 1e-10, 1e-10);
      bpt::test::require_close(lse, ref_lse, 1e-10, 1e-10);
      const at::Tensor g = at::randn_like(out);
      const auto got = bpt::test::grads(out, g, {q, k, v});
      const auto want = bpt::test::grads(ref_out, g, {q, k, v});
      for (size_t i = 0; i < 3; ++i) bpt::test::require_close(got[i], want[i], 1e-10, 1e-10);
    }
  }
}

TEST_CASE("a T=1 decode step with kv_offset sees exactly the cached keys", "[attention]") {
  at::manual_seed(1);
  const at::Tensor q = at::randn({1, 8, 1, 64});
  const at::Tensor k = at::randn({1, 1, 33, 64}), v = at::randn({1, 1, 33, 64});
  auto [out, lse] = bpt::ops::blockwise_attention(q, k, v, /*causal=*/true, -1, 16, std::nullopt, std::nullopt, 32);
  auto [ref_out, ref_lse] = naive_attention(q, k, v, true, at::Tensor(), 32);
  bpt::test::require_close(out, ref_out, 1e-5, 1e-5);
  bpt::test::require_close(lse, ref_lse, 1e-5, 1e-5);
}

TEST_CASE("blockwise attention rejects bad arguments with a message naming them", "[attention]") {
  const at::Tensor q = at::randn({1, 4, 8, 16}), k = at::randn({1, 3, 8, 16});
  REQUIRE_THROWS_WITH(bpt::ops::blockwise_attention(q, k, k, true, 4, 4),
                      Catch::Contains("must be a multiple of k's heads Hkv = 3"));
  const at::Tensor k2 = at::randn({1, 2, 8, 16});
  REQUIRE_THROWS_WITH(bpt::ops::blockwise_attention(q, k2, k2, true, 0, 4), Catch::Contains("q_chunk must be"));
  REQUIRE_THROWS_WITH(bpt::ops::blockwise_attention(q, k2, k2, true, 4, 4, std::nullopt, std::nullopt, 3),
                      Catch::Contains("kv_offset + T"));
  REQUIRE_THROWS_WITH(bpt::ops::blockwise_attention(q, k2.to(at::kDouble), k2, true, 4, 4),
                      Catch::Contains("k must have the dtype of q"));
  const at::Tensor no_heads = at::randn({1, 0, 8, 16});
  REQUIRE_THROWS_WITH(bpt::ops::blockwise_attention(q, no_heads, no_heads, true, 4, 4),
                      Catch::Contains("k must have at least one head"));
}

TEST_CASE("BlockwiseAttention module forwards its options to the op", "[attention][nn]") {
  bpt::nn::BlockwiseAttention attention(bpt::nn::BlockwiseAttentionOptions().causal(true).q_chunk(4).k_chunk(4));
  const at::Tensor q = at::randn({1, 2, 10, 8}), k = at::randn({1, 1, 10, 8}), v = at::randn({1, 1, 10, 8});
  auto [ref_out, ref_lse] = naive_attention(q, k, v, true, at::Tensor(), 0);
  bpt::test::require_close(attention(q, k, v), ref_out, 1e-5, 1e-5);
  REQUIRE_THROWS_WITH(bpt::nn::BlockwiseAttention(bpt::nn::BlockwiseAttentionOptions().k_chunk(0)),
                      Catch::Contains("k_chunk must be a positive block size or -1"));
}
