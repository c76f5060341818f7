#pragma once
// The bpt ops as C++ functions. Each call goes through the dispatcher (torch.ops.bpt.*),
// so autograd, device kernels and fake tensors behave as they do from Python.

#include <ATen/core/Tensor.h>

#include <tuple>

namespace bpt::ops {

// x [..., D], weight [D] -> [..., D]; y = weight * cast(x / sqrt(mean(x^2) + eps)).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// -> (grad_x [..., D], grad_weight [D])
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps);

// x [B, H, T, D], cos/sin [T, D] or [B, T, D] -> x * cos + rotate_half(x) * sin, with
// rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]) (Hugging Face layout).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// grad_out [B, H, T, D] -> grad_x (the map is linear in x).
at::Tensor rotary_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin);

}  // namespace bpt::ops
