// bpt::bitlinear: BitNet b1.58's fake quantization for training, over ATen (bound as
// CompositeExplicitAutograd, so it runs on every device), with a Meta kernel and autograd.
//
//   activations, per token:  s_x = 127 / max(max|x|, 1e-5),  x_q = clamp(round(x s_x), -128, 127)
//   weights, per tensor:     s_w = max(mean|W|, 1e-5),       W_q = clamp(round(W / s_w), -1, 1)
//   y = (x_q / s_x) (W_q s_w)^T
// Quantization runs in fp32 (fp64 for fp64 inputs); the matmul in the input dtype. The
// backward passes gradients straight through both quantizers (the straight-through
// estimator): grad_x = grad_y (W_q s_w), grad_W = grad_y^T (x_q / s_x).

#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

constexpr const char* kOp = "bpt::bitlinear";
constexpr double kMinScale = 1e-5;  // BitNet's clamp on both scales

void check_args(const at::Tensor& x, const at::Tensor& weight) {
  check_float(kOp, "x", x);
  check_float(kOp, "weight", weight);
  check_dim(kOp, "weight", weight, 2, "[N, K] (out_features, in_features)");
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must be [..., K], got a scalar");
  check_size(kOp, "x.size(-1)", x.sym_size(-1), weight.sym_size(1), "weight.size(1), in_features K");
  check_same_dtype(kOp, "weight", weight, x, "x");
  check_same_device(kOp, "weight", weight, x, "x");
}

// Quantization arithmetic: fp32, or fp64 for fp64 inputs (the tests' reference precision).
at::ScalarType quantize_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Integer levels (as floats) and their scale: value = levels / scale (activations, a scale
// per token) or levels * scale (weights, one scale).
struct Levels {
  at::Tensor levels, scale;
};

Levels activation_levels(const at::Tensor& x) {
  const at::Tensor xf = x.to(quantize_type(x));
  const at::Tensor scale = 127.0 / at::amax(xf.abs(), {-1}, /*keepdim=*/true).clamp_min(kMinScale);
  return {(xf * scale).round().clamp(-128, 127), scale};
}

Levels weight_levels(const at::Tensor& weight) {
  const at::Tensor wf = weight.to(quantize_type(weight));
  const at::Tensor scale = wf.abs().mean().clamp_min(kMinScale);
  return {(wf / scale).round().clamp(-1, 1), scale};
}

// x_q / s_x and W_q s_w in the inputs' dtypes, for the straight-through backward.
at::Tensor dequantized_activations(const at::Tensor& x) {
  const Levels q = activation_levels(x);
  return (q.levels / q.scale).to(x.scalar_type());
}

at::Tensor dequantized_weight(const at::Tensor& weight) {
  const Levels q = weight_levels(weight);
  return (q.levels * q.scale).to(weight.scalar_type());
}

// The integer levels are multiplied first: their products and sums are integers below 2^24,
// exact in fp32 in any order, so the result is ternary_linear's to the bit (acc * (s_w / s_x)
// in fp32) and the packed model computes what the trained one did.
at::Tensor bitlinear_impl(const at::Tensor& x, const at::Tensor& weight) {
  check_args(x, weight);
  const Levels xq = activation_levels(x), wq = weight_levels(weight);
  // fp16 would overflow past 65504 (K = 8192 and outputs near 50 reach it): its levels
  // multiply in fp32. bf16 has fp32's range.
  const at::ScalarType matmul_type = x.scalar_type() == at::kHalf ? at::kFloat : x.scalar_type();
  const at::Tensor acc = at::matmul(xq.levels.to(matmul_type), wq.levels.to(matmul_type).t());
  return (acc.to(xq.levels.scalar_type()) * (wq.scale / xq.scale)).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> bitlinear_backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& weight) {
  check_args(x, weight);
  const int64_t k = weight.size(1), n = weight.size(0);
  TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.size(-1) == n &&
                  grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              "bpt::bitlinear_backward: grad_out must be [..., N] with x's leading dims, got ", grad_out.sizes(),
              " for x ", x.sizes(), " and N = ", n);
  const at::Tensor g = grad_out.reshape({-1, n});
  const at::Tensor grad_x = at::mm(g, dequantized_weight(weight)).view(x.sizes());
  const at::Tensor grad_weight = at::mm(g.t(), dequantized_activations(x).reshape({-1, k}));
  return {grad_x, grad_weight};
}

at::Tensor bitlinear_meta(const at::Tensor& x, const at::Tensor& weight) {
  check_args(x, weight);
  std::vector<c10::SymInt> sizes(x.sym_sizes().begin(), x.sym_sizes().end());
  sizes.back() = weight.sym_size(0);
  return at::empty_symint(sizes, x.options());
}

std::tuple<at::Tensor, at::Tensor> bitlinear_backward_meta(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& weight) {
  check_args(x, weight);
  check_same_dtype("bpt::bitlinear_backward", "grad_out", grad_out, x, "x");
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(weight.sym_sizes(), weight.options())};
}

// Saves x and W; the backward quantizes them again (cheap next to the matmuls, and nothing
// quantized is kept between forward and backward).
class BitLinearFunction : public torch::autograd::Function<BitLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    return ops::bitlinear(x, weight);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight] = ops::bitlinear_backward(grads[0], saved[0], saved[1]);
    return {grad_x, grad_weight};
  }
};

at::Tensor bitlinear_autograd(const at::Tensor& x, const at::Tensor& weight) {
  return BitLinearFunction::apply(x, weight);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CompositeExplicitAutograd, m) {
  m.impl("bitlinear", &bitlinear_impl);
  m.impl("bitlinear_backward", &bitlinear_backward_impl);
}

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("bitlinear", &bitlinear_meta);
  m.impl("bitlinear_backward", &bitlinear_backward_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) { m.impl("bitlinear", &bitlinear_autograd); }

}  // namespace bpt::ops
