#pragma once
// Summing a weight gradient over chunks, for the ops written over ATen (blockwise_ffn,
// chunked_lm_loss).

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

namespace bpt::ops {

// sum += a^T b, with sum in the accumulation type (fp32 for bf16/fp16 a and b, whose GEMM
// rounds the chunk's product once before it is added; in place for fp32/fp64).
inline void add_transposed_product(at::Tensor& sum, const at::Tensor& a, const at::Tensor& b) {
  if (sum.scalar_type() == a.scalar_type()) {
    sum.addmm_(a.t(), b);
  } else {
    sum.add_(at::mm(a.t(), b));
  }
}

}  // namespace bpt::ops
