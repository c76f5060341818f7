// bpt::rms_norm: argument checks, CPU, CUDA and Meta kernels, autograd.

#include "csrc/ops/rms_norm/rms_norm.h"

#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

constexpr const char* kOp = "bpt::rms_norm";

void check_args(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(kOp, "x", x);
  TORCH_CHECK(x.dim() >= 1, kOp, ": x must have at least one dimension (the normalised one), got a scalar");
  TORCH_CHECK(weight.defined() && weight.dim() == 1, kOp, ": weight must be 1-D [D], got shape ",
              weight.defined() ? weight.sym_sizes() : c10::SymIntArrayRef{});
  check_size(kOp, "weight.size(0)", weight.sym_size(0), x.sym_size(-1), "x.size(-1)");
  check_same_dtype(kOp, "weight", weight, x, "x");
  check_same_device(kOp, "weight", weight, x, "x");
  TORCH_CHECK(eps >= 0, kOp, ": eps must be >= 0, got ", eps);
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_args(x, weight, eps);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  cpu::rms_norm_forward_kernel()(xc, weight.contiguous(), eps, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& weight, double eps) {
  check_args(x, weight, eps);
  check_like("bpt::rms_norm_backward", "grad_out", grad_out, x, "x");
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options().dtype(accumulate_type(x)));
  cpu::rms_norm_backward_kernel()(grad_out.contiguous(), x.contiguous(), weight.contiguous(), eps, grad_x,
                                  grad_weight);
  return {grad_x, grad_weight.to(weight.scalar_type())};
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_args(x, weight, eps);
  return generic::rms_norm_forward(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, double eps) {
  check_args(x, weight, eps);
  check_like("bpt::rms_norm_backward", "grad_out", grad_out, x, "x");
  return generic::rms_norm_backward(grad_out, x, weight, eps);
}

at::Tensor rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_args(x, weight, eps);
  return at::empty_symint(x.sym_sizes(), x.options());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_meta(const at::Tensor& grad_out, const at::Tensor& x,
                                                          const at::Tensor& weight, double eps) {
  check_args(x, weight, eps);
  check_like("bpt::rms_norm_backward", "grad_out", grad_out, x, "x");
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(weight.sym_sizes(), weight.options())};
}

// Saves x and weight only; the backward recomputes the per-row statistics (one cheap
// pass) rather than keeping them.
class RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight});
    ctx->saved_data["eps"] = eps;
    return ops::rms_norm(x, weight, eps);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto [grad_x, grad_weight] = ops::rms_norm_backward(grads[0], saved[0], saved[1], ctx->saved_data["eps"].toDouble());
    return {grad_x, grad_weight, at::Tensor()};
  }
};

at::Tensor rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RMSNormFunction::apply(x, weight, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

// ATen calls (rms_norm_generic.cpp) until a fused CUDA kernel pays.
TORCH_LIBRARY_IMPL(bpt, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("rms_norm_backward", &rms_norm_backward_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) { m.impl("rms_norm", &rms_norm_autograd); }

}  // namespace bpt::ops
