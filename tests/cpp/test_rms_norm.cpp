// bpt::rms_norm through the dispatcher from C++, against the plain ATen expression in fp64.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include "csrc/nn/rms_norm.h"
#include "csrc/ops/ops.h"
#include "tests/cpp/helpers.h"

namespace {

at::Tensor reference(const at::Tensor& x, const at::Tensor& w, double eps) {
  const at::Tensor x64 = x.to(at::kDouble);
  return x64 * at::rsqrt(x64.pow(2).mean(-1, true) + eps) * w.to(at::kDouble);
}

}  // namespace

TEST_CASE("rms_norm matches the fp64 expression, forward and gradients", "[rms_norm]") {
  at::manual_seed(0);
  for (int64_t D : {1, 7, 64, 1000}) {
    INFO("D = " << D);
    const at::Tensor x = at::randn({3, 5, D}, at::kDouble).requires_grad_();
    const at::Tensor w = at::randn({D}, at::kDouble).requires_grad_();
    const at::Tensor y = bpt::ops::rms_norm(x, w, 1e-5);
    const at::Tensor y_ref = reference(x, w, 1e-5);
    bpt::test::require_close(y, y_ref, 1e-12, 1e-12);

    const at::Tensor g = at::randn_like(y);
    const auto got = bpt::test::grads(y, g, {x, w});
    const auto want = bpt::test::grads(y_ref, g, {x, w});
    bpt::test::require_close(got[0], want[0], 1e-10, 1e-10);
    bpt::test::require_close(got[1], want[1], 1e-10, 1e-10);
  }
}

TEST_CASE("rms_norm in bf16 stays within bf16 rounding of fp64", "[rms_norm]") {
  at::manual_seed(1);
  const at::Tensor x = at::randn({17, 4096}).to(at::kBFloat16);
  const at::Tensor w = at::randn({4096}).to(at::kBFloat16);
  const at::Tensor y = bpt::ops::rms_norm(x, w, 1e-6);
  REQUIRE(y.scalar_type() == at::kBFloat16);
  // Two roundings to bf16 (normalised value, then product): about 2 ulp of 2^-8.
  bpt::test::require_close(y, reference(x, w, 1e-6), 2e-2, 1e-2);
}

TEST_CASE("rms_norm accepts non-contiguous input", "[rms_norm]") {
  at::manual_seed(2);
  const at::Tensor x = at::randn({8, 6, 32}).transpose(0, 1);
  REQUIRE_FALSE(x.is_contiguous());
  const at::Tensor w = at::randn({32});
  bpt::test::require_close(bpt::ops::rms_norm(x, w, 1e-6), reference(x, w, 1e-6), 1e-5, 1e-5);
}

TEST_CASE("rms_norm rejects bad arguments with a message naming them", "[rms_norm]") {
  const at::Tensor x = at::randn({4, 8});
  REQUIRE_THROWS_WITH(bpt::ops::rms_norm(x, at::ones({7}), 1e-6), Catch::Contains("weight.size(0) must be 8"));
  REQUIRE_THROWS_WITH(bpt::ops::rms_norm(x, at::ones({8}, at::kDouble), 1e-6),
                      Catch::Contains("weight must have the dtype of x"));
  REQUIRE_THROWS_WITH(bpt::ops::rms_norm(x.to(at::kInt), at::ones({8}, at::kInt), 1e-6),
                      Catch::Contains("x must be float32, float64, bfloat16 or float16"));
  REQUIRE_THROWS_WITH(bpt::ops::rms_norm(x, at::ones({8}), -1.0), Catch::Contains("eps must be >= 0"));
}

TEST_CASE("RMSNorm module starts at weight 1 and normalises the last dimension", "[rms_norm][nn]") {
  bpt::nn::RMSNorm norm(bpt::nn::RMSNormOptions(16).eps(1e-5));
  REQUIRE(norm->weight.sizes() == at::IntArrayRef{16});
  REQUIRE(at::all(norm->weight == 1).item<bool>());
  REQUIRE(norm->named_parameters().contains("weight"));
  const at::Tensor x = at::randn({2, 3, 16});
  const at::Tensor y = norm(x);
  // Unit weight: every row has root-mean-square ~1.
  bpt::test::require_close(y.pow(2).mean(-1), at::ones({2, 3}), 1e-4, 1e-4);
}
