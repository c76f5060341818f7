#pragma once
// Rotary position embedding in Hugging Face's rotate_half layout: the first and second
// halves of the head dimension form the (real, imaginary) pairs.
//   out[:h] = x[:h] * cos[:h] - x[h:] * sin[:h]
//   out[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]          (h = D / 2)

#include <ATen/core/Tensor.h>

#include "csrc/ops/cpu_capability.h"

namespace bpt::cpu {

// x and out [B, H, T, D] contiguous; cos, sin [Bc, T, D] contiguous with Bc in {1, B}.
// `transpose` applies the adjoint map (used by the backward: grad_x from grad_out).
using rotary_fn = void(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose,
                       const at::Tensor& out);

BPT_CPU_KERNEL(rotary_fn, rotary_apply)

}  // namespace bpt::cpu

// The same in ATen calls, for any device (rotary_generic.cpp): the CUDA kernel, and on the CPU
// a second implementation to test against. x [B, H, T, D]; cos, sin [T, D] or [Bc, T, D].
namespace bpt::generic {

at::Tensor rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose);

}  // namespace bpt::generic
