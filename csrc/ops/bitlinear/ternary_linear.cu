// bpt::ternary_linear on CUDA: the CPU op's numerics (ternary.cpp, ternary_gemm.h), in two
// simple kernels. Not tuned: one thread block per (output row, token), bytes of codes read
// one at a time, __dp4a for four int8 products.
//
//   quantize_tokens: x [M, K] -> x_q [M, K4] int8 (K4 = K rounded up to 4, zero padded;
//                    rintf rounds half to even) and dequant[m] = scale / s_m with
//                    s_m = 127 / max(max|x_m|, 1e-5); NaN for a token holding NaN or inf
//                    (its x_q is then 0).
//   ternary_gemv:    y[m, n] = float(sum_k x_q[m, k] w_q[n, k]) * dequant[m], in x's dtype.
//
// The float operations are spelled with __fmul_rn / __fdiv_rn so that no compiler flag
// (fast math, FMA contraction) changes a rounding: the levels equal the CPU op's bit for bit.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <vector>

#include "csrc/ops/bitlinear/ternary.h"

namespace bpt::ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// One block per token.
template <typename scalar_t>
__global__ void quantize_tokens(const scalar_t* __restrict__ x, int64_t K, int64_t K4, const float* __restrict__ scale,
                                int8_t* __restrict__ x_q, float* __restrict__ dequant) {
  const int64_t m = blockIdx.x;
  const scalar_t* xm = x + m * K;
  __shared__ float warp_max[kWarps];
  __shared__ float token_scale;

  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float a = fabsf(static_cast<float>(xm[k]));
    finite &= a <= 3.402823466e38f;  // false for inf and NaN
    amax = fmaxf(amax, a);
  }
  for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  finite = __syncthreads_and(finite);
  if (threadIdx.x == 0) {
    float block_max = 0.0f;
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w]);
    const float s = __fdiv_rn(127.0f, fmaxf(block_max, 1e-5f));
    token_scale = finite ? s : 0.0f;
    dequant[m] = finite ? __fdiv_rn(*scale, s) : __int_as_float(0x7fffffff);  // NaN
  }
  __syncthreads();
  const float s = token_scale;
  for (int64_t k = threadIdx.x; k < K4; k += blockDim.x) {
    float v = 0.0f;  // padding, and every value of a non-finite token
    if (k < K && s > 0.0f) v = fminf(127.0f, fmaxf(-128.0f, rintf(__fmul_rn(static_cast<float>(xm[k]), s))));
    x_q[m * K4 + k] = static_cast<int8_t>(v);
  }
}

// Four 2-bit codes (w_q + 1) of one packed byte as four int8 w_q, low byte first.
__device__ __forceinline__ int unpack_byte(unsigned int byte) {
  const unsigned int codes = (byte & 3u) | ((byte >> 2 & 3u) << 8) | ((byte >> 4 & 3u) << 16) | ((byte >> 6) << 24);
  return static_cast<int>(__vsub4(codes, 0x01010101u));
}

// One block per (output row n, token m); tokens beyond gridDim.y wrap around.
template <typename scalar_t>
__global__ void ternary_gemv(const int8_t* __restrict__ x_q, const float* __restrict__ dequant,
                             const uint8_t* __restrict__ packed, int64_t M, int64_t N, int64_t row_bytes,
                             scalar_t* __restrict__ y) {
  const int64_t n = blockIdx.x;
  const uint8_t* codes = packed + n * row_bytes;
  __shared__ int warp_sum[kWarps];
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const int* xw = reinterpret_cast<const int*>(x_q + m * row_bytes * 4);  // 4 activations per code byte
    int acc = 0;
    for (int64_t b = threadIdx.x; b < row_bytes; b += blockDim.x) acc = __dp4a(unpack_byte(codes[b]), xw[b], acc);
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      int total = 0;
      for (int w = 0; w < kWarps; ++w) total += warp_sum[w];
      y[m * N + n] = static_cast<scalar_t>(__fmul_rn(static_cast<float>(total), dequant[m]));
    }
    __syncthreads();  // warp_sum is reused by the next token
  }
}

at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t in_features) {
  check_ternary_linear_args(x, packed, scale, in_features);
  TORCH_CHECK(x.is_cuda(), "bpt::ternary_linear: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, N = packed.size(0), row_bytes = packed.size(1), K4 = 4 * row_bytes;
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);

  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor packed_c = packed.contiguous();
  const at::Tensor scale_f = scale.to(at::kFloat).reshape({});
  at::Tensor x_q = at::empty({M, K4}, x.options().dtype(at::kChar));
  at::Tensor dequant = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_sizes);

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bpt::ternary_linear", [&] {
    quantize_tokens<scalar_t><<<static_cast<unsigned int>(M), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), K, K4, scale_f.const_data_ptr<float>(), x_q.mutable_data_ptr<int8_t>(),
        dequant.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned int>(N), static_cast<unsigned int>(std::min<int64_t>(M, 65535)));
    ternary_gemv<scalar_t><<<grid, kThreads, 0, stream>>>(x_q.const_data_ptr<int8_t>(),
                                                          dequant.const_data_ptr<float>(),
                                                          packed_c.const_data_ptr<uint8_t>(), M, N, row_bytes,
                                                          y.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CUDA, m) { m.impl("ternary_linear", &ternary_linear_cuda); }

}  // namespace bpt::ops
