// bpt::rotary: argument checks, CPU, CUDA and Meta kernels, autograd.

#include "csrc/ops/rotary/rotary.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

constexpr const char* kOp = "bpt::rotary";

void check_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float(kOp, "x", x);
  check_dim(kOp, "x", x, 4, "[B, H, T, D]");
  TORCH_SYM_CHECK((x.sym_size(3) % 2).sym_eq(0), kOp, ": x's head dim D must be even, got ",
                  x.sym_size(3));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    check_float(kOp, name, t);
    TORCH_CHECK(t.dim() == 2 || t.dim() == 3, kOp, ": ", name, " must be [T, D] or [B, T, D], got shape ",
                t.sym_sizes());
    check_size(kOp, name, t.sym_size(-1), x.sym_size(3), "x.size(3), the head dim D");
    check_size(kOp, name, t.sym_size(-2), x.sym_size(2), "x.size(2), the sequence length T");
    if (t.dim() == 3) {
      TORCH_SYM_CHECK(t.sym_size(0).sym_eq(1) | t.sym_size(0).sym_eq(x.sym_size(0)), kOp, ": ", name,
                      ".size(0) must be 1 or x.size(0) = ", x.sym_size(0), ", got ", t.sym_size(0));
    }
    check_same_dtype(kOp, name, t, x, "x");
    check_same_device(kOp, name, t, x, "x");
  }
  TORCH_CHECK(cos.sym_sizes() == sin.sym_sizes(), kOp, ": cos and sin must have the same shape, got ",
              cos.sym_sizes(), " and ", sin.sym_sizes());
}

at::Tensor as_batched(const at::Tensor& t) { return (t.dim() == 2 ? t.unsqueeze(0) : t).contiguous(); }

at::Tensor apply_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  check_args(x, cos, sin);
  at::Tensor out = at::empty(x.sizes(), x.options());
  cpu::rotary_apply_kernel()(x.contiguous(), as_batched(cos), as_batched(sin), transpose, out);
  return out;
}

at::Tensor rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return apply_cpu(x, cos, sin, /*transpose=*/false);
}

at::Tensor rotary_backward_cpu(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  return apply_cpu(grad_out, cos, sin, /*transpose=*/true);
}

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_args(x, cos, sin);
  return generic::rotary_apply(x, cos, sin, /*transpose=*/false);
}

at::Tensor rotary_backward_cuda(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  check_args(grad_out, cos, sin);
  return generic::rotary_apply(grad_out, cos, sin, /*transpose=*/true);
}

at::Tensor rotary_meta(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_args(x, cos, sin);
  return at::empty_symint(x.sym_sizes(), x.options());
}

at::Tensor rotate_half(const at::Tensor& x) {
  const auto halves = x.chunk(2, -1);
  return at::cat({-halves[1], halves[0]}, -1);
}

// Sums a [B, H, T, D] product down to the shape of cos/sin ([T, D], [1, T, D] or [B, T, D]).
at::Tensor reduce_to(const at::Tensor& prod, const at::Tensor& like) {
  at::Tensor r = prod.sum(1);  // over heads
  if (like.dim() == 2) return r.sum(0);
  if (like.sym_size(0) == 1 && r.sym_size(0) != 1) return r.sum(0, /*keepdim=*/true);
  return r;
}

// The map is linear in x, so grad_x needs only cos and sin. x is saved only for the rarer
// case of gradients flowing into cos/sin (learned or scaled frequencies).
class RotaryFunction : public torch::autograd::Function<RotaryFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool tables_need_grad = cos.requires_grad() || sin.requires_grad();
    ctx->save_for_backward({cos, sin, tables_need_grad ? x : at::Tensor()});
    return ops::rotary(x, cos, sin);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &cos = saved[0], &sin = saved[1], &x = saved[2];
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    at::Tensor grad_x, grad_cos, grad_sin;
    if (ctx->needs_input_grad(0)) grad_x = ops::rotary_backward(g, cos, sin);
    if (ctx->needs_input_grad(1)) grad_cos = reduce_to(g * x, cos);
    if (ctx->needs_input_grad(2)) grad_sin = reduce_to(g * rotate_half(x), sin);
    return {grad_x, grad_cos, grad_sin};
  }
};

at::Tensor rotary_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return RotaryFunction::apply(x, cos, sin);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CPU, m) {
  m.impl("rotary", &rotary_cpu);
  m.impl("rotary_backward", &rotary_backward_cpu);
}

// ATen calls (rotary_generic.cpp) until a fused CUDA kernel pays.
TORCH_LIBRARY_IMPL(bpt, CUDA, m) {
  m.impl("rotary", &rotary_cuda);
  m.impl("rotary_backward", &rotary_backward_cuda);
}

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("rotary", &rotary_meta);
  m.impl("rotary_backward", &rotary_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) { m.impl("rotary", &rotary_autograd); }

}  // namespace bpt::ops
