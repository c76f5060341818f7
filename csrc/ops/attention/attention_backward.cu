// bpt::blockwise_attention's backward on CUDA, tiled for tensor cores, in FlashAttention-2's
// order: bf16/fp16 inputs, head dims 64 and 128, fp32 accumulation, the CPU op's semantics
// (causal with kv_offset, GQA by index, segment ids, lse's own gradient). It needs only q, k,
// v, out and lse (through delta), so it follows the tiled forward or the generic one.
// Opt-in with the forward (BPT_CUDA_ATTENTION=tiled, attention_tiles.cuh) until a GPU run has
// passed tests/python/test_cuda.py with it. A file of its own beside attention_forward.cu, the
// two sharing attention_tiles.cuh: nvcc compiles each for two architectures, and two files
// build in parallel.
//
// One thread block of 4 warps per (64 keys, kv head); warp w owns keys 16w..16w+15. The block
// loops over the query heads that share its kv head and, for each, over the 64-row query tiles
// that can see its keys (causal: from the first row whose position reaches the first key):
//   S^T = K Q^T and dP^T = V dO^T                    (tensor cores, fp32 in shared memory)
//   P^T = exp(scale S^T - lse), masked to 0;  dS^T = scale P^T (dP^T - delta)   (bf16/fp16)
//   dV += P^T dO,  dK += dS^T Q                        (fp32 fragments, kept across the loop)
//   dQ += dS K                                         (fp32 atomics into a [B, Hq, T, D] sum)
// dK and dV are written once at the end, in the inputs' dtype, with no atomics: the block
// holds every query head of its kv head. delta = rowsum(dO * O) - dL/dlse comes first, from a
// kernel of its own. Deterministic mode (torch.use_deterministic_algorithms) takes the generic
// backward instead, whose sums have a fixed order.
//
// Unlike the forward's O, dK and dV need no per-row rescale, so they stay in WMMA fragments.

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "csrc/ops/attention/attention.h"
#include "csrc/ops/attention/attention_backward.cuh"

namespace bpt::ops {
namespace {

using namespace tiles;

template <typename T, int D>
void launch(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& grad_lse, const at::Tensor& lse,
            const at::Tensor& segment_ids, const at::Tensor& grad_q, const at::Tensor& grad_k,
            const at::Tensor& grad_v) {
  const auto in = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); };
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  const at::Tensor delta = at::empty({p.batch, p.q_heads, p.q_len}, q.options().dtype(at::kFloat));
  softmax_row_terms<T><<<static_cast<unsigned int>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      in(grad_out), in(out), grad_lse.defined() ? grad_lse.const_data_ptr<float>() : nullptr, rows, D,
      delta.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const size_t bytes = backward_shared_bytes<D>(sizeof(T));
  const auto kernel = attention_backward_tiled<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  const KernelParams kp{p.q_heads, p.kv_heads, p.q_len, p.kv_len, p.kv_offset, p.causal, static_cast<float>(p.scale)};
  const dim3 grid(static_cast<unsigned int>((p.kv_len + kKeys - 1) / kKeys), static_cast<unsigned int>(p.kv_heads),
                  static_cast<unsigned int>(p.batch));
  kernel<<<grid, kThreads, bytes, stream>>>(
      kp, in(q), in(k), in(v), in(grad_out), lse.const_data_ptr<float>(), delta.const_data_ptr<float>(),
      segment_ids.defined() ? segment_ids.const_data_ptr<int64_t>() : nullptr, grad_q.mutable_data_ptr<float>(),
      reinterpret_cast<T*>(grad_k.mutable_data_ptr()), reinterpret_cast<T*>(grad_v.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What the tiled kernel covers; false leaves the call to the generic blocks.
bool tiled_backward(const AttentionParams& p, const at::Tensor& grad_out, const at::Tensor& grad_lse,
                    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, const at::Tensor& segment_ids, at::Tensor& grad_q, at::Tensor& grad_k,
                    at::Tensor& grad_v) {
  const auto dtype = q.scalar_type();
  // (grad_q's fp32 atomics add in no fixed order: deterministic mode takes the generic blocks.)
  if (!tiles_cover(dtype, p.head_dim) || at::globalContext().deterministicAlgorithms() || p.q_len == 0 ||
      p.kv_len == 0 || p.batch * p.kv_heads == 0 || p.kv_heads > 65535 || p.batch > 65535) {
    return false;
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  const size_t needed = p.head_dim == 64 ? backward_shared_bytes<64>(2) : backward_shared_bytes<128>(2);
  if (device->major < 8 || device->sharedMemPerBlockOptin < needed) return false;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor grad_out_c = grad_out.contiguous(), outc = out.contiguous();
  if (!aligned_for_tiles(qc, kc, vc, grad_out_c)) return false;
  const at::Tensor glse = grad_lse.defined() ? grad_lse.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor lsec = lse.to(at::kFloat).contiguous();
  const at::Tensor seg = p.has_segments ? segment_ids.to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor grad_q_sum = at::zeros({p.batch, p.q_heads, p.q_len, p.head_dim}, q.options().dtype(at::kFloat));
  grad_k = at::empty({p.batch, p.kv_heads, p.kv_len, p.head_dim}, k.options());
  grad_v = at::empty({p.batch, p.kv_heads, p.kv_len, p.head_dim}, v.options());
  dispatch_tiles(dtype, p.head_dim, [&](auto element, auto dim) {
    launch<decltype(element), dim()>(p, qc, kc, vc, grad_out_c, outc, glse, lsec, seg, grad_q_sum, grad_k, grad_v);
  });
  grad_q = grad_q_sum.to(dtype);
  return true;
}

// Hands the kernel to attention.cpp's CUDA entry when the library loads.
const bool registered = [] {
  tiled_attention_backward() = &tiled_backward;
  return true;
}();

}  // namespace
}  // namespace bpt::ops
