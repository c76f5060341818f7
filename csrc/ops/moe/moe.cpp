// bpt::moe_dispatch / bpt::moe_combine: a mixture-of-experts layer's token shuffles, over ATen
// (CompositeExplicitAutograd: every device), with Meta kernels and autograd.
//
//   dispatch: x [N, C], index [M] (the token of each expert slot, experts' slots contiguous)
//             -> x[index] [M, C]
//   combine:  y [M, C] (expert outputs in slot order), index [M], weight [M] (router weights)
//             -> out [N, C], out[n] = sum over slots m of token n of weight[m] y[m]
//
// A token routed to k experts has k slots; a token whose every slot was dropped (over an
// expert's capacity) gets 0 from combine, and the layer's residual passes it through.
// combine sums in fp32 (fp64 for fp64) and is differentiable in y and in weight (the router's
// gradient); index is not differentiable.

#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

void check_index(const char* op, const at::Tensor& index, const at::Tensor& ref) {
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  check_dim(op, "index", index, 1, "[M] (a token per expert slot)");
  check_same_device(op, "index", index, ref, "x");
}

void check_dispatch(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "bpt::moe_dispatch";
  check_float(op, "x", x);
  check_dim(op, "x", x, 2, "[N, C] (tokens, hidden)");
  check_index(op, index, x);
}

void check_combine(const at::Tensor& y, const at::Tensor& index, const at::Tensor& weight, int64_t num_tokens) {
  constexpr const char* op = "bpt::moe_combine";
  check_float(op, "y", y);
  check_dim(op, "y", y, 2, "[M, C] (expert slots, hidden)");
  check_index(op, index, y);
  check_float(op, "weight", weight);
  check_dim(op, "weight", weight, 1, "[M] (a router weight per slot)");
  check_size(op, "index.size(0)", index.sym_size(0), y.sym_size(0), "y.size(0), the slots M");
  check_size(op, "weight.size(0)", weight.sym_size(0), y.sym_size(0), "y.size(0), the slots M");
  check_same_device(op, "weight", weight, y, "y");
  TORCH_CHECK(num_tokens >= 0, op, ": num_tokens must be >= 0, got ", num_tokens);
}

at::Tensor dispatch_impl(const at::Tensor& x, const at::Tensor& index) {
  check_dispatch(x, index);
  return at::index_select(x, 0, index);
}

at::Tensor dispatch_backward_impl(const at::Tensor& grad_out, const at::Tensor& index, int64_t num_tokens) {
  check_index("bpt::moe_dispatch_backward", index, grad_out);
  const at::Tensor sum = at::zeros({num_tokens, grad_out.size(1)}, grad_out.options().dtype(accumulate_type(grad_out)));
  sum.index_add_(0, index, grad_out.to(sum.scalar_type()));
  return sum.to(grad_out.scalar_type());
}

at::Tensor combine_impl(const at::Tensor& y, const at::Tensor& index, const at::Tensor& weight, int64_t num_tokens) {
  check_combine(y, index, weight, num_tokens);
  const at::ScalarType acc = accumulate_type(y);
  const at::Tensor out = at::zeros({num_tokens, y.size(1)}, y.options().dtype(acc));
  out.index_add_(0, index, y.to(acc) * weight.to(acc).unsqueeze(1));
  return out.to(y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> combine_backward_impl(const at::Tensor& grad_out, const at::Tensor& y,
                                                         const at::Tensor& index, const at::Tensor& weight) {
  check_combine(y, index, weight, grad_out.size(0));
  const at::ScalarType acc = accumulate_type(y);
  const at::Tensor grad_slots = at::index_select(grad_out, 0, index).to(acc);  // [M, C]
  const at::Tensor grad_y = (grad_slots * weight.to(acc).unsqueeze(1)).to(y.scalar_type());
  const at::Tensor grad_weight = (grad_slots * y.to(acc)).sum(1).to(weight.scalar_type());
  return {grad_y, grad_weight};
}

at::Tensor dispatch_meta(const at::Tensor& x, const at::Tensor& index) {
  check_dispatch(x, index);
  return at::empty_symint({index.sym_size(0), x.sym_size(1)}, x.options());
}

at::Tensor dispatch_backward_meta(const at::Tensor& grad_out, const at::Tensor& index, int64_t num_tokens) {
  check_index("bpt::moe_dispatch_backward", index, grad_out);
  return at::empty_symint({c10::SymInt(num_tokens), grad_out.sym_size(1)}, grad_out.options());
}

at::Tensor combine_meta(const at::Tensor& y, const at::Tensor& index, const at::Tensor& weight, int64_t num_tokens) {
  check_combine(y, index, weight, num_tokens);
  return at::empty_symint({c10::SymInt(num_tokens), y.sym_size(1)}, y.options());
}

std::tuple<at::Tensor, at::Tensor> combine_backward_meta(const at::Tensor& grad_out, const at::Tensor& y,
                                                         const at::Tensor& index, const at::Tensor& weight) {
  check_combine(y, index, weight, 0);
  check_same_dtype("bpt::moe_combine_backward", "grad_out", grad_out, y, "y");
  return {at::empty_symint(y.sym_sizes(), y.options()), at::empty_symint(weight.sym_sizes(), weight.options())};
}

class DispatchFunction : public torch::autograd::Function<DispatchFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({index});
    ctx->saved_data["num_tokens"] = x.size(0);
    return ops::moe_dispatch(x, index);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const at::Tensor index = ctx->get_saved_variables()[0];
    return {ops::moe_dispatch_backward(grads[0], index, ctx->saved_data["num_tokens"].toInt()), at::Tensor()};
  }
};

class CombineFunction : public torch::autograd::Function<CombineFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& y, const at::Tensor& index,
                            const at::Tensor& weight, int64_t num_tokens) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({y, index, weight});
    return ops::moe_combine(y, index, weight, num_tokens);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto [grad_y, grad_weight] = ops::moe_combine_backward(grads[0], saved[0], saved[1], saved[2]);
    return {grad_y, at::Tensor(), grad_weight, at::Tensor()};
  }
};

at::Tensor dispatch_autograd(const at::Tensor& x, const at::Tensor& index) { return DispatchFunction::apply(x, index); }

at::Tensor combine_autograd(const at::Tensor& y, const at::Tensor& index, const at::Tensor& weight,
                            int64_t num_tokens) {
  return CombineFunction::apply(y, index, weight, num_tokens);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CompositeExplicitAutograd, m) {
  m.impl("moe_dispatch", &dispatch_impl);
  m.impl("moe_dispatch_backward", &dispatch_backward_impl);
  m.impl("moe_combine", &combine_impl);
  m.impl("moe_combine_backward", &combine_backward_impl);
}

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("moe_dispatch", &dispatch_meta);
  m.impl("moe_dispatch_backward", &dispatch_backward_meta);
  m.impl("moe_combine", &combine_meta);
  m.impl("moe_combine_backward", &combine_backward_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) {
  m.impl("moe_dispatch", &dispatch_autograd);
  m.impl("moe_combine", &combine_autograd);
}

}  // namespace bpt::ops
