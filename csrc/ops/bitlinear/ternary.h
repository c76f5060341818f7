#pragma once
// bpt::ternary_pack and bpt::ternary_linear (BitNet b1.58 inference): the argument checks,
// shared by the CPU and Meta kernels (ternary.cpp) and the CUDA kernel (ternary_linear.cu).
// The packed format is documented in ternary_gemm.h.

#include <ATen/core/Tensor.h>

namespace bpt::ops {

// weight [N, K] float.
void check_ternary_pack_args(const at::Tensor& weight);

// x [..., in_features] float, packed uint8 [N, ceil(in_features / 4)], scale a one-element
// float tensor, all on one device.
void check_ternary_linear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t in_features);

}  // namespace bpt::ops
