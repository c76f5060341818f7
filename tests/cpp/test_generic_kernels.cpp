// The device-generic kernels (ATen calls; bpt's CUDA kernels until fused ones replace them)
// against the CPU kernels on the CPU, which are themselves tested against naive fp64 math:
// blockwise attention (odd lengths, GQA, segments, kv_offset, ragged chunks, grad_lse),
// RMSNorm and rotary, forward and backward, in fp64, fp32 and bf16.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <optional>

#include "csrc/ops/attention/attention.h"
#include "csrc/ops/ops.h"
#include "csrc/ops/rms_norm/rms_norm.h"
#include "csrc/ops/rotary/rotary.h"
#include "helpers.h"

namespace {

struct Tolerance {
  double rtol, atol;
};

Tolerance tolerance(at::ScalarType dtype) {
  if (dtype == at::kDouble) return {1e-10, 1e-10};
  if (dtype == at::kFloat) return {1e-4, 1e-5};
  return {2e-2, 2e-2};  // bf16: the kernels round at different points
}

}  // namespace

TEST_CASE("generic blockwise attention equals the CPU kernel, forward and backward", "[generic]") {
  struct Case {
    int64_t hq, hkv, t, s, d, q_chunk, k_chunk, kv_offset;
    bool causal, segments;
  };
  const Case cases[] = {
      {4, 4, 13, 13, 16, 5, 4, 0, true, false},   // odd T, ragged chunks
      {8, 2, 9, 17, 32, 4, 8, 8, true, true},     // GQA 4, kv_offset, segments
      {4, 1, 7, 7, 64, -1, 3, 0, false, true},    // MQA, non-causal documents
      {2, 2, 1, 12, 16, 1, 5, 11, true, false},   // one decode step against a cache
  };
  for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
    for (const Case& c : cases) {
      at::manual_seed(7);
      const auto options = at::TensorOptions().dtype(dtype);
      const at::Tensor q = at::randn({2, c.hq, c.t, c.d}, options), k = at::randn({2, c.hkv, c.s, c.d}, options),
                       v = at::randn({2, c.hkv, c.s, c.d}, options);
      std::optional<at::Tensor> seg;
      if (c.segments) seg = (at::arange(c.s, at::kLong) >= c.s / 3).to(at::kLong).unsqueeze(0).repeat({2, 1});
      INFO("dtype " << dtype << ", Hq " << c.hq << ", Hkv " << c.hkv << ", T " << c.t << ", S " << c.s);
      const auto p = bpt::ops::make_attention_params(q, k, v, c.causal, c.q_chunk, c.k_chunk, seg, std::nullopt,
                                                     c.kv_offset);
      const auto [out, lse] =
          bpt::ops::blockwise_attention(q, k, v, c.causal, c.q_chunk, c.k_chunk, seg, std::nullopt, c.kv_offset);
      const auto [g_out, g_lse] = bpt::generic::attention_forward(p, q, k, v, seg.value_or(at::Tensor()));
      const Tolerance tol = tolerance(dtype);
      REQUIRE(g_out.scalar_type() == out.scalar_type());
      REQUIRE(g_lse.scalar_type() == lse.scalar_type());
      bpt::test::require_close(g_out, out, tol.rtol, tol.atol);
      bpt::test::require_close(g_lse, lse, tol.rtol, tol.atol);

      const at::Tensor grad_out = at::randn_like(out), grad_lse = at::randn_like(lse);
      const auto want = bpt::ops::blockwise_attention_backward(grad_out, grad_lse, q, k, v, out, lse, c.causal,
                                                               c.q_chunk, c.k_chunk, seg, std::nullopt, c.kv_offset);
      const auto got = bpt::generic::attention_backward(p, grad_out, grad_lse, q, k, v, out, lse,
                                                        seg.value_or(at::Tensor()));
      bpt::test::require_close(std::get<0>(got), std::get<0>(want), tol.rtol, tol.atol);
      bpt::test::require_close(std::get<1>(got), std::get<1>(want), tol.rtol, tol.atol);
      bpt::test::require_close(std::get<2>(got), std::get<2>(want), tol.rtol, tol.atol);
    }
  }
}

TEST_CASE("generic RMSNorm and rotary equal the CPU kernels, forward and backward", "[generic]") {
  for (const auto dtype : {at::kDouble, at::kFloat, at::kBFloat16}) {
    at::manual_seed(3);
    const auto options = at::TensorOptions().dtype(dtype);
    const Tolerance tol = tolerance(dtype);
    INFO("dtype " << dtype);
    const at::Tensor x = at::randn({3, 5, 24}, options), weight = at::randn({24}, options);
    const at::Tensor grad = at::randn_like(x);
    bpt::test::require_close(bpt::generic::rms_norm_forward(x, weight, 1e-5), bpt::ops::rms_norm(x, weight, 1e-5),
                             tol.rtol, tol.atol);
    const auto [gx, gw] = bpt::generic::rms_norm_backward(grad, x, weight, 1e-5);
    const auto [wx, ww] = bpt::ops::rms_norm_backward(grad, x, weight, 1e-5);
    bpt::test::require_close(gx, wx, tol.rtol, tol.atol);
    REQUIRE(gw.scalar_type() == ww.scalar_type());
    bpt::test::require_close(gw, ww, tol.rtol, 4 * tol.atol);  // a sum over 15 rows

    const at::Tensor h = at::randn({2, 3, 7, 16}, options), g = at::randn_like(h);
    for (const at::Tensor& angles : {at::randn({7, 8}, at::kDouble), at::randn({2, 7, 8}, at::kDouble)}) {
      const at::Tensor full = at::cat({angles, angles}, -1);  // Hugging Face's [cos | cos] layout
      const at::Tensor cos = full.cos().to(dtype), sin = full.sin().to(dtype);
      bpt::test::require_close(bpt::generic::rotary_apply(h, cos, sin, false), bpt::ops::rotary(h, cos, sin),
                               tol.rtol, tol.atol);
      bpt::test::require_close(bpt::generic::rotary_apply(g, cos, sin, true), bpt::ops::rotary_backward(g, cos, sin),
                               tol.rtol, tol.atol);
    }
  }
}
