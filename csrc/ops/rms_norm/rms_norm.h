#pragma once
// RMSNorm over the last dimension: y = weight * cast(x * rsqrt(mean(x^2) + eps)).
// The normalised value is rounded to x's dtype before the weight multiplies it, as Hugging
// Face's LlamaRMSNorm does, so bf16 models match transformers.

#include <ATen/core/Tensor.h>

#include <tuple>

#include "csrc/ops/cpu_capability.h"

namespace bpt::cpu {

// x [rows, D] contiguous, weight [D] contiguous, same dtype; out [rows, D] preallocated.
using rms_norm_forward_fn = void(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const at::Tensor& out);
// grad_out, x [rows, D]; grad_x [rows, D] in x's dtype; grad_weight [D] in fp32 or fp64.
using rms_norm_backward_fn = void(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& weight, double eps, const at::Tensor& grad_x,
                                  const at::Tensor& grad_weight);

BPT_CPU_KERNEL(rms_norm_forward_fn, rms_norm_forward)
BPT_CPU_KERNEL(rms_norm_backward_fn, rms_norm_backward)

}  // namespace bpt::cpu

// The same in ATen calls, for any device (rms_norm_generic.cpp): the CUDA kernels, and on the
// CPU a second implementation to test against. Arguments already checked; x [..., D].
namespace bpt::generic {

at::Tensor rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);
// (grad_x in x's dtype, grad_weight in weight's)
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps);

}  // namespace bpt::generic
