#pragma once
// Blockwise (flash-style) attention: the parameters every device kernel shares, checked
// once by make_attention_params (the front of both the CPU and any CUDA kernel).
//
// Layout: q [B, Hq, T, D], k and v [B, Hkv, S, D], out [B, Hq, T, D], lse [B, Hq, T] in fp32
// (fp64 for fp64 input).
// Query head h reads key/value head h / (Hq / Hkv) (GQA, MQA) without copies. Query i sits
// at key position kv_offset + i: causal attention lets it see keys j <= kv_offset + i.
// segment_ids [B, S] (int64) gives each key position a document; query i belongs to the
// document of position kv_offset + i, and attends only within it.

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "csrc/ops/cpu_capability.h"

namespace bpt::ops {

struct AttentionParams {
  int64_t batch = 0, q_heads = 0, kv_heads = 0;
  int64_t q_len = 0;   // T
  int64_t kv_len = 0;  // S
  int64_t head_dim = 0;
  bool causal = false;
  int64_t q_chunk = 0, k_chunk = 0;  // resolved: 1 <= chunk <= length
  double scale = 1.0;
  int64_t kv_offset = 0;
  bool has_segments = false;

  int64_t group() const { return q_heads / kv_heads; }
};

// Checks every argument (shapes, dtypes, devices, chunks, offsets) with one message naming
// the argument and what was expected; resolves chunk = -1 to the full length and scale to
// 1/sqrt(D). Works on concrete shapes (kernels), see attention.cpp for the Meta check.
AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                      int64_t q_chunk, int64_t k_chunk,
                                      const std::optional<at::Tensor>& segment_ids, std::optional<double> scale,
                                      int64_t kv_offset);

// The tiled tensor-core forward of a CUDA build (attention_forward.cu, opt-in with
// BPT_CUDA_ATTENTION=tiled) sets this when the library loads; null otherwise. It returns
// false for what it does not cover (dtype, head dim), and the generic blocks run instead.
using tiled_attention_fn = bool(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& segment_ids, at::Tensor& out,
                                at::Tensor& lse);
tiled_attention_fn*& tiled_attention_forward();

// The tiled backward (attention_backward.cu, opt-in with the forward), set the same way: the
// gradients of q, k and v in their dtypes, or false and the generic backward runs.
using tiled_attention_backward_fn = bool(const AttentionParams& p, const at::Tensor& grad_out,
                                         const at::Tensor& grad_lse, const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                         const at::Tensor& segment_ids, at::Tensor& grad_q, at::Tensor& grad_k,
                                         at::Tensor& grad_v);
tiled_attention_backward_fn*& tiled_attention_backward();

}  // namespace bpt::ops

namespace bpt::cpu {

// All tensors contiguous. q, k, v (and grad_out) in the compute type: fp32 or fp64, or bf16
// when bf16_gemm_available(); out, lse, delta and the gradients in the accumulation type
// (fp64 for fp64, fp32 otherwise). segment_ids int64 [B, S] or undefined. Outputs preallocated.
using attention_forward_fn = void(const ops::AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& segment_ids, const at::Tensor& out,
                                  const at::Tensor& lse);

// delta [B, Hq, T] = rowsum(grad_out * out) - grad_lse. grad_q [B, Hq, T, D] and
// grad_k_slices, grad_v_slices come zeroed, either [B, Hkv, S, D] (the final gradients) or
// [B, Hq, S, D] (one slice per query head, for more parallel tasks; the caller sums each group).
using attention_backward_fn = void(const ops::AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                                   const at::Tensor& delta, const at::Tensor& segment_ids, const at::Tensor& grad_q,
                                   const at::Tensor& grad_k_slices, const at::Tensor& grad_v_slices);

BPT_CPU_KERNEL(attention_forward_fn, attention_forward)
BPT_CPU_KERNEL(attention_backward_fn, attention_backward)

}  // namespace bpt::cpu

// The same blocks in ATen calls, for any device (attention_generic.cpp): the CUDA kernel until
// a tiled tensor-core one replaces it, and on the CPU a second implementation to test against.
// Arguments as the op takes them (any dtype, any layout), checked by make_attention_params;
// segment_ids and grad_lse may be undefined. Outputs as the op's: out and the gradients in the
// inputs' dtypes, lse in opmath.
namespace bpt::generic {

std::tuple<at::Tensor, at::Tensor> attention_forward(const ops::AttentionParams& p, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& segment_ids);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const ops::AttentionParams& p,
                                                                  const at::Tensor& grad_out,
                                                                  const at::Tensor& grad_lse, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  const at::Tensor& segment_ids);

}  // namespace bpt::generic
