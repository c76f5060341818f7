#include <ATen/core/dispatch/Dispatcher.h>

#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("bpt::rms_norm");
  return op.call(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("bpt::rms_norm_backward");
  return op.call(grad_out, x, weight, eps);
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("bpt::rotary");
  return op.call(x, cos, sin);
}

at::Tensor rotary_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("bpt::rotary_backward");
  return op.call(grad_out, cos, sin);
}

}  // namespace bpt::ops
