// bpt::blockwise_attention's forward on CUDA, tiled for tensor cores: bf16/fp16 inputs, head
// dims 64 and 128, fp32 accumulation and online softmax, the CPU op's semantics (causal with
// kv_offset, GQA by index, segment ids, fp32 lse). Written with the WMMA API (16x16x16
// fragments), not hand-written PTX: simple first.
//
// Opt-in (BPT_CUDA_ATTENTION=tiled) until a GPU run has passed tests/python/test_cuda.py with
// it: by default the ATen blocks of attention_generic.cpp run. The tiled backward
// (attention_backward.cu) needs only q, k, v, out and lse, so it follows either forward.
//
// One thread block of 4 warps per (64 query rows, query head); warp w owns rows 16w..16w+15.
// For each 64-key tile that the rows can see (causal: up to the last row's position):
//   S = Q K^T (tensor cores, fp32) -> scaled, masked -> m, l and P = exp(S - m) (bf16/fp16)
//   O = O * exp(m_old - m_new) + P V (tensor cores, fp32 in shared memory)
// then out = O / l and lse = m + log l. O lives in shared memory, not in fragments, because
// the rows a WMMA fragment's elements belong to are unspecified and each row has its own
// rescale factor.

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "csrc/ops/attention/attention.h"
#include "csrc/ops/attention/attention_forward.cuh"

namespace bpt::ops {
namespace {

using namespace tiles;

template <typename T, int D>
void launch(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& segment_ids, const at::Tensor& out, const at::Tensor& lse) {
  const size_t bytes = forward_shared_bytes<D>(sizeof(T));
  const auto kernel = attention_forward_tiled<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  const KernelParams kp{p.q_heads, p.kv_heads, p.q_len, p.kv_len, p.kv_offset, p.causal, static_cast<float>(p.scale)};
  const dim3 grid(static_cast<unsigned int>((p.q_len + kRows - 1) / kRows), static_cast<unsigned int>(p.q_heads),
                  static_cast<unsigned int>(p.batch));
  kernel<<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      kp, reinterpret_cast<const T*>(q.const_data_ptr()), reinterpret_cast<const T*>(k.const_data_ptr()),
      reinterpret_cast<const T*>(v.const_data_ptr()),
      segment_ids.defined() ? segment_ids.const_data_ptr<int64_t>() : nullptr,
      reinterpret_cast<T*>(out.mutable_data_ptr()), lse.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What the tiled kernel covers; false leaves the call to the generic blocks.
bool tiled_forward(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& segment_ids, at::Tensor& out, at::Tensor& lse) {
  const auto dtype = q.scalar_type();
  if (!tiles_cover(dtype, p.head_dim) || p.q_len == 0 || p.batch * p.q_heads == 0 || p.q_heads > 65535 ||
      p.batch > 65535) {
    return false;
  }
  const c10::cuda::CUDAGuard guard(q.device());
  // Built for sm_80 and sm_90a; the tiles need more shared memory than some cards allow a
  // block (99 KB on sm_86/89 is less than D = 128's).
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  const size_t needed = p.head_dim == 64 ? forward_shared_bytes<64>(2) : forward_shared_bytes<128>(2);
  if (device->major < 8 || device->sharedMemPerBlockOptin < needed) return false;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  if (!aligned_for_tiles(qc, kc, vc)) return false;
  const at::Tensor seg = p.has_segments ? segment_ids.to(at::kLong).contiguous() : at::Tensor();
  out = at::empty_like(qc);
  lse = at::empty({p.batch, p.q_heads, p.q_len}, q.options().dtype(at::kFloat));
  dispatch_tiles(dtype, p.head_dim, [&](auto element, auto dim) {
    launch<decltype(element), dim()>(p, qc, kc, vc, seg, out, lse);
  });
  return true;
}

// Hands the kernel to attention.cpp's CUDA entry when the library loads.
const bool registered = [] {
  tiled_attention_forward() = &tiled_forward;
  return true;
}();

}  // namespace
}  // namespace bpt::ops
