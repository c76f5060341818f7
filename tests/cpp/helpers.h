#pragma once
// Shared test helpers: tolerant comparison with a readable failure, and gradients.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <string>
#include <vector>

namespace bpt::test {

// Largest absolute difference, for failure messages.
inline double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

inline void require_close(const at::Tensor& got, const at::Tensor& want, double rtol, double atol) {
  INFO("max |got - want| = " << max_abs_diff(got, want) << " (rtol " << rtol << ", atol " << atol << ")");
  REQUIRE(got.sizes() == want.sizes());
  REQUIRE(at::allclose(got.to(at::kDouble), want.to(at::kDouble), rtol, atol));
}

// d(sum(out * grad_out))/d(inputs)
inline std::vector<at::Tensor> grads(const at::Tensor& out, const at::Tensor& grad_out,
                                     const std::vector<at::Tensor>& inputs) {
  return torch::autograd::grad({out}, inputs, {grad_out});
}

}  // namespace bpt::test
