// bpt::rotary through the dispatcher from C++, against Hugging Face's rotate_half formula.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include "csrc/nn/rotary.h"
#include "csrc/ops/ops.h"
#include "tests/cpp/helpers.h"

namespace {

at::Tensor rotate_half(const at::Tensor& x) {
  const auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

// x [B, H, T, D], cos/sin [B, T, D] or [T, D]
at::Tensor reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const at::Tensor c = cos.dim() == 3 ? cos.unsqueeze(1) : cos;
  const at::Tensor s = sin.dim() == 3 ? sin.unsqueeze(1) : sin;
  return x * c + rotate_half(x) * s;
}

}  // namespace

TEST_CASE("rotary matches x*cos + rotate_half(x)*sin, with gradients for all inputs", "[rotary]") {
  at::manual_seed(0);
  for (bool batched_tables : {false, true}) {
    INFO("batched cos/sin: " << batched_tables);
    const at::Tensor x = at::randn({2, 3, 5, 8}, at::kDouble).requires_grad_();
    const auto table_shape = batched_tables ? std::vector<int64_t>{2, 5, 8} : std::vector<int64_t>{5, 8};
    const at::Tensor cos = at::randn(table_shape, at::kDouble).requires_grad_();
    const at::Tensor sin = at::randn(table_shape, at::kDouble).requires_grad_();
    const at::Tensor y = bpt::ops::rotary(x, cos, sin);
    const at::Tensor y_ref = reference(x, cos, sin);
    bpt::test::require_close(y, y_ref, 1e-12, 1e-12);
    const at::Tensor g = at::randn_like(y);
    const auto got = bpt::test::grads(y, g, {x, cos, sin});
    const auto want = bpt::test::grads(y_ref, g, {x, cos, sin});
    for (size_t i = 0; i < got.size(); ++i) bpt::test::require_close(got[i], want[i], 1e-10, 1e-10);
  }
}

TEST_CASE("rotary rejects bad shapes with a message naming the argument", "[rotary]") {
  const at::Tensor x = at::randn({1, 2, 4, 8});
  REQUIRE_THROWS_WITH(bpt::ops::rotary(x, at::randn({4, 6}), at::randn({4, 6})),
                      Catch::Contains("cos must be 8 (x.size(3), the head dim D)"));
  REQUIRE_THROWS_WITH(bpt::ops::rotary(x, at::randn({3, 8}), at::randn({3, 8})),
                      Catch::Contains("the sequence length T"));
  REQUIRE_THROWS_WITH(bpt::ops::rotary(at::randn({2, 4, 8}), at::randn({4, 8}), at::randn({4, 8})),
                      Catch::Contains("x must be [B, H, T, D]"));
  REQUIRE_THROWS_WITH(bpt::ops::rotary(at::randn({1, 2, 4, 7}), at::randn({4, 7}), at::randn({4, 7})),
                      Catch::Contains("must be even"));
}

TEST_CASE("Rotary module at position 0 is the identity and preserves norms", "[rotary][nn]") {
  bpt::nn::Rotary rope(bpt::nn::RotaryOptions(16).theta(10000.0));
  REQUIRE(rope->inv_freq.sizes() == at::IntArrayRef{8});
  const at::Tensor x = at::randn({2, 4, 6, 16});
  const at::Tensor zeros = at::zeros({2, 6}, at::kLong);
  bpt::test::require_close(rope(x, zeros), x, 0, 1e-6);
  // A rotation of each (i, i + D/2) pair keeps every head vector's length.
  const at::Tensor positions = at::arange(6, at::kLong).unsqueeze(0).expand({2, 6}).contiguous();
  const at::Tensor y = rope(x, positions);
  bpt::test::require_close(y.norm(2, -1), x.norm(2, -1), 1e-5, 1e-5);
}
