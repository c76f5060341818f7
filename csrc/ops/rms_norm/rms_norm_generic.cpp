// bpt::rms_norm in ATen calls, for any device (the CUDA kernel until a fused one pays), with
// the CPU kernel's arithmetic: statistics in opmath, the normalised value rounded to x's dtype
// before the weight multiplies it.

#include <ATen/ATen.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/rms_norm/rms_norm.h"

namespace bpt::generic {

at::Tensor rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const auto opmath = ops::accumulate_type(x);
  const at::Tensor xf = x.to(opmath);
  const at::Tensor normalised = (xf * at::rsqrt(xf.square().mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type());
  return (normalised.to(opmath) * weight.to(opmath)).to(x.scalar_type());
}

// With n = x rstd and dot = sum_i g_i w_i x_i (per row):
//   grad_x = rstd g w - x rstd^3 dot / D,   grad_weight = the sum over rows of g n.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps) {
  const auto opmath = ops::accumulate_type(x);
  const at::Tensor xf = x.to(opmath), gf = grad_out.to(opmath), wf = weight.to(opmath);
  const int64_t D = x.size(-1);
  const at::Tensor rstd = at::rsqrt(xf.square().mean(-1, /*keepdim=*/true) + eps);
  const at::Tensor dot = (gf * wf * xf).sum(-1, /*keepdim=*/true);
  const at::Tensor grad_x = rstd * gf * wf - xf * (rstd.pow(3) * dot / static_cast<double>(D));
  const at::Tensor grad_weight = (gf * xf * rstd).reshape({-1, D}).sum(0);
  return {grad_x.to(x.scalar_type()), grad_weight.to(weight.scalar_type())};
}

}  // namespace bpt::generic
