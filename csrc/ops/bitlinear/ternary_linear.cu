// bpt::ternary_linear on CUDA: the CPU op's numerics (ternary.cpp, ternary_gemm.h) in two steps.
//
//   quantize_tokens: x [M, K] -> x_q (int8, the layout below), x_sum[m] = sum_k x_q[m, k] and
//                    dequant[m] = scale / s_m, s_m = 127 / max(max|x_m|, 1e-5); x_q rounds with
//                    rintf (half to even). A token holding NaN or inf gets x_q = 0, x_sum = 0
//                    and dequant = NaN. One block per token.
//   ternary_gemm:    y[m, n] = float(sum_k x_q[m, k] w_q[n, k]) * dequant[m], in x's dtype.
//
// The float operations are spelled with __fmul_rn / __fdiv_rn so that FMA contraction and fast
// math's approximate division change no rounding: the outputs equal the CPU op's bit for bit
// (NaN payloads aside; -ftz would still flush a subnormal, which only a tiny scale makes). The
// int32 sums are exact (in_features < 2^23 keeps even the biased sums below 2^31), so their
// order does not matter.
//
// ternary_gemm, one kernel template in two shapes: a warp owns 4 output rows and kTokens
// tokens (32 int32 sums at most) over the whole of K, with no shared memory and no block sync.
//   M == 1 (decoding): the GEMV, kTokens = 1, its loop unrolled twice for more loads in flight.
//   Memory bound on the 2-bit codes (N K / 4 bytes, an eighth of a bf16 weight's).
//   M >= 2: the small-batch GEMM, tiles of kTokens = 8 tokens (the remainder, M % 8, in one
//   more launch with the smallest of 1, 2, 4, 8 that holds it). Each decoded code word feeds
//   kTokens x 4 __dp4a, each loaded activation word 4 rows. Why 8: a code byte costs kTokens
//   __dp4a; at 64 __dp4a per SM and clock (half the int32 rate, an assumption) an H100 runs
//   out of __dp4a before memory bandwidth from about 5 tokens on, so an 8-token tile is
//   compute bound and a wider one would buy only registers (147 on sm_90a, 166 on sm_80
//   already: 3 blocks of 4 warps per SM).
//   Larger M runs the same kernel over tiles of 8, blockIdx.y walking them (a grid row of 65535
//   tiles at most; blocks loop past that). Its time grows with M while a bf16 cuBLAS matmul of
//   the dense weight stays memory bound, so past about 32 tokens (prefill) that should be
//   faster (an estimate, not measured): an int8 tensor-core (mma.s8) GEMM would be the path
//   there, and is not written.
// Lane l reads 16 bytes of each row's codes (64 weights, one "chunk") at chunks l, l + 32, ...,
// so a warp's load covers 512 contiguous bytes. The words are not decoded to -1/0/+1: a code
// word masked as (w >> 2s) & 0x03030303 gives four codes w_q + 1 in 0..2, which __dp4a
// multiplies as signed bytes, and sum (w_q + 1) x_q - x_sum = sum w_q x_q, as the CPU's SIMD
// kernels do. The 4 x kTokens sums of a warp are reduce-scattered across its lanes (31
// shuffles for 32 sums), and lane 32 v / (4 kTokens) stores sum v.
//
// x_q layout, per token, made so that field s of each code byte lines up with one int32 of
// activations and every load is a coalesced 16-byte load: chunk c (code bytes 16c..16c+15,
// activations 64c..64c+63) owns four int4 of activations, one per code word j = 0..3 of the
// chunk, at int4 index 128 (c / 32) + width j + c % 32 (width 32, or chunks % 32 in the last,
// partial group of 32 chunks). Within that int4, int32 s holds, byte i, the activation of field
// s of code byte i of the word: x_q[64c + 16j + 4i + s]. A token takes 64 ceil(K4 / 64) bytes
// (K4 = 4 ceil(K / 4)), zero past K.
//
// Code loads: 16-byte vectors where every row starts 16-byte aligned (row bytes a multiple of
// 16, an aligned pointer; true for K a multiple of 64); otherwise bytes one at a time (the
// same chunks, bytes past the row read as 0, against zero activations), with no separate
// tail. Activations are read from global memory through L1 (a token tile is kTokens K bytes,
// shared by every warp of the SM that works on it, 88 KB for 8 tokens of K = 11008), not
// staged in shared memory.
//
// Not tuned, or not measured: nothing here has run on a GPU yet (tests/python/test_cuda.py
// compares it with the CPU op bit for bit; tools/bench/bitlinear.py --device cuda times it).
// The quantize step is a launch of its own and reads x twice; the byte path loads a byte at a
// time; there is no split over K, so few rows with a long K keep few warps busy; an 8-token
// tile of K = 28672 (224 KB) no longer fits L1 and streams from L2.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "csrc/ops/bitlinear/ternary.h"

namespace bpt::ops {
namespace {

constexpr int kQuantizeThreads = 256;
constexpr int kQuantizeWarps = kQuantizeThreads / 32;
constexpr int kGemmWarps = 4;  // per block of ternary_gemm
constexpr int kRowsPerWarp = 4;
constexpr int kChunkBytes = 16;  // code bytes per lane and step: 64 weights
constexpr int kGroupChunks = 32;  // chunks per group of the x_q layout: one warp step

// The int4 of token activations that go with code word j of chunk c (see the layout above).
__device__ __forceinline__ int x_q_index(int c, int j, int chunks) {
  const int group = c / kGroupChunks;
  const int width = group < chunks / kGroupChunks ? kGroupChunks : chunks % kGroupChunks;
  return 4 * kGroupChunks * group + width * j + c % kGroupChunks;
}

__device__ __forceinline__ float quantize(float v, float s) {
  return fminf(127.0f, fmaxf(-128.0f, rintf(__fmul_rn(v, s))));
}

// x [M, K] row-major -> x_q [M, 16 chunks] int32 words, x_sum [M], dequant [M]. One block per token.
template <typename scalar_t>
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_tokens(const scalar_t* __restrict__ x, int64_t K, int chunks, const float* __restrict__ scale,
                    int* __restrict__ x_q, int* __restrict__ x_sum, float* __restrict__ dequant) {
  const int64_t m = blockIdx.x;
  const scalar_t* xm = x + m * K;
  __shared__ float warp_max[kQuantizeWarps];
  __shared__ int warp_sum[kQuantizeWarps];
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
    for (int w = 0; w < kQuantizeWarps; ++w) block_max = fmaxf(block_max, warp_max[w]);
    const float s = __fdiv_rn(127.0f, fmaxf(block_max, 1e-5f));
    token_scale = finite ? s : 0.0f;
    dequant[m] = finite ? __fdiv_rn(*scale, s) : __int_as_float(0x7fffffff);  // NaN
  }
  __syncthreads();

  // Word q is int32 q % 4 (field s) of int4 q / 4; find the chunk c and code word j it serves.
  const float s = token_scale;
  const int full_groups = chunks / kGroupChunks, tail = chunks % kGroupChunks;
  int sum = 0;
  for (int q = threadIdx.x; q < 16 * chunks; q += blockDim.x) {
    const int p = q / 4, field = q % 4, group = p / (4 * kGroupChunks), in_group = p % (4 * kGroupChunks);
    const int width = group < full_groups ? kGroupChunks : tail;
    const int64_t first = 64 * static_cast<int64_t>(kGroupChunks * group + in_group % width) +
                          16 * (in_group / width) + field;  // x index of byte 0
    unsigned int word = 0;
    for (int i = 0; i < 4; ++i) {
      const int64_t k = first + 4 * i;
      // Padding, and every value of a non-finite token (s == 0), is 0.
      const int v = k < K && s > 0.0f ? static_cast<int>(quantize(static_cast<float>(xm[k]), s)) : 0;
      sum += v;
      word |= (static_cast<unsigned int>(v) & 0xffu) << (8 * i);
    }
    x_q[m * 16 * chunks + q] = static_cast<int>(word);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) warp_sum[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
    for (int w = 0; w < kQuantizeWarps; ++w) total += warp_sum[w];
    x_sum[m] = total;
  }
}

// Every pointer and size of one ternary_gemm launch: `tokens` tokens from x_q's first.
struct GemmParams {
  const int4* x_q;       // [tokens, 4 chunks] int4, the layout above
  const int* x_sum;      // [tokens]
  const float* dequant;  // [tokens]
  const uint8_t* packed;  // [rows, row_bytes], TQ2
  int64_t tokens, rows, row_bytes;
  int chunks;  // ceil(row_bytes / 16)
};

enum class CodeLoad { Vector, Bytes };

// Code bytes 16c .. 16c + 15 of a row as four little-endian words; kLoad == Vector needs the
// row 16-byte aligned and row_bytes a multiple of 16. Bytes past the row are 0.
template <CodeLoad kLoad>
__device__ __forceinline__ uint4 load_chunk(const uint8_t* __restrict__ row, int c, int64_t row_bytes) {
  if constexpr (kLoad == CodeLoad::Vector) {
    return __ldg(reinterpret_cast<const uint4*>(row) + c);
  } else {
    unsigned int w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int b = 0; b < kChunkBytes; ++b) {
      const int64_t at = int64_t{kChunkBytes} * c + b;
      if (at < row_bytes) w[b / 4] |= static_cast<unsigned int>(__ldg(row + at)) << (8 * (b % 4));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__device__ __forceinline__ unsigned int word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// Sums each of kValues ints (a power of two, at most 32) over the warp's 32 lanes, halving the
// values a lane carries at each step (kValues - 1 + log2(32 / kValues) shuffles): on return,
// lane l holds the total of value l / (32 / kValues). Every lane of the warp must call it.
template <int kValues, int kOffset = 16>
__device__ __forceinline__ int warp_reduce_scatter(int (&v)[kValues]) {
  static_assert(kValues >= 1 && kValues <= 32 && (kValues & (kValues - 1)) == 0);
  if constexpr (kOffset == 0) {
    return v[0];
  } else {
    constexpr int kCount = kValues * kOffset / 16;  // values a lane carries into this step (0: one)
    if constexpr (kCount >= 2) {
      // Lanes with bit kOffset set keep the upper half of the values, the others the lower.
      const bool upper = (threadIdx.x & kOffset) != 0;
#pragma unroll
      for (int i = 0; i < kCount / 2; ++i) {
        const int send = upper ? v[i] : v[i + kCount / 2];
        const int keep = upper ? v[i + kCount / 2] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOffset);
      }
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], kOffset);
    }
    return warp_reduce_scatter<kValues, kOffset / 2>(v);
  }
}

// y [tokens, rows] = (x_q . w_q^T - x_sum) * dequant. Block: kGemmWarps warps, each 4 rows
// (rows past the end repeat the last and are not stored); blockIdx.y walks token tiles of
// kTokens (tokens past the end repeat the last, likewise).
template <typename scalar_t, int kTokens, CodeLoad kLoad>
__global__ void __launch_bounds__(kGemmWarps * 32) ternary_gemm(GemmParams p, scalar_t* __restrict__ y) {
  constexpr int kSums = kRowsPerWarp * kTokens;  // sum r * kTokens + t: row r, token t
  constexpr int kUnroll = kTokens <= 2 ? 2 : 1;  // more loads in flight where memory bound
  const int lane = threadIdx.x % 32;
  const int64_t first_row = (int64_t{blockIdx.x} * kGemmWarps + threadIdx.x / 32) * kRowsPerWarp;
  if (first_row >= p.rows) return;  // the whole warp
  const uint8_t* row[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) row[r] = p.packed + std::min(first_row + r, p.rows - 1) * p.row_bytes;
  const int64_t x_stride = 4 * int64_t{p.chunks};  // int4 per token

  const int64_t tiles = (p.tokens + kTokens - 1) / kTokens;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int4* x[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) x[t] = p.x_q + std::min(tile * kTokens + t, p.tokens - 1) * x_stride;
    int acc[kSums];
#pragma unroll
    for (int v = 0; v < kSums; ++v) acc[v] = 0;

#pragma unroll kUnroll
    for (int c = lane; c < p.chunks; c += 32) {
      uint4 codes[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) codes[r] = load_chunk<kLoad>(row[r], c, p.row_bytes);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // Field s of the word's four code bytes: four codes w_q + 1, as signed bytes.
        int field[kRowsPerWarp][4];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const unsigned int w = word_of(codes[r], j);
#pragma unroll
          for (int s = 0; s < 4; ++s) field[r][s] = static_cast<int>((w >> (2 * s)) & 0x03030303u);
        }
        const int at = x_q_index(c, j, p.chunks);
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          const int4 a = __ldg(x[t] + at);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            int& sum = acc[r * kTokens + t];
            sum = __dp4a(field[r][0], a.x, sum);
            sum = __dp4a(field[r][1], a.y, sum);
            sum = __dp4a(field[r][2], a.z, sum);
            sum = __dp4a(field[r][3], a.w, sum);
          }
        }
      }
    }

    const int total = warp_reduce_scatter<kSums>(acc);
    constexpr int kLanesPerSum = 32 / kSums;
    const int v = lane / kLanesPerSum;
    const int64_t n = first_row + v / kTokens, m = tile * kTokens + v % kTokens;
    if (lane % kLanesPerSum == 0 && n < p.rows && m < p.tokens) {
      const int acc_exact = total - p.x_sum[m];  // sum (w_q + 1) x_q - sum x_q
      y[m * p.rows + n] = static_cast<scalar_t>(__fmul_rn(static_cast<float>(acc_exact), p.dequant[m]));
    }
  }
}

// Tokens [first, first + count) of the quantized x through ternary_gemm<kTokens>.
template <typename scalar_t, int kTokens>
void launch_gemm(GemmParams p, int64_t first, int64_t count, bool vector_loads, scalar_t* y, cudaStream_t stream) {
  p.x_q += first * 4 * p.chunks;
  p.x_sum += first;
  p.dequant += first;
  p.tokens = count;
  y += first * p.rows;
  const int64_t rows_per_block = kGemmWarps * kRowsPerWarp;
  const int64_t tiles = (count + kTokens - 1) / kTokens;
  const dim3 grid(static_cast<unsigned int>((p.rows + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned int>(std::min<int64_t>(tiles, 65535)));
  if (vector_loads) {
    ternary_gemm<scalar_t, kTokens, CodeLoad::Vector><<<grid, kGemmWarps * 32, 0, stream>>>(p, y);
  } else {
    ternary_gemm<scalar_t, kTokens, CodeLoad::Bytes><<<grid, kGemmWarps * 32, 0, stream>>>(p, y);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t in_features) {
  check_ternary_linear_args(x, packed, scale, in_features);
  TORCH_CHECK(x.is_cuda(), "bpt::ternary_linear: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, N = packed.size(0), row_bytes = packed.size(1);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  // (in_features < 2^23, checked above, keeps 16 x chunks, the quantize loop's int, far from
  // overflow.)
  constexpr int64_t kMaxRows = int64_t{INT_MAX} * kGemmWarps * kRowsPerWarp;
  TORCH_CHECK(M <= INT_MAX && N <= kMaxRows, "bpt::ternary_linear: on CUDA, x must hold at most ", INT_MAX,
              " tokens and packed at most ", kMaxRows, " rows; got ", M, " tokens and ", N, " rows");
  const int chunks = static_cast<int>((row_bytes + kChunkBytes - 1) / kChunkBytes);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_sizes);
  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor packed_c = packed.contiguous();
  const at::Tensor scale_f = scale.to(at::kFloat).reshape({});
  at::Tensor x_q = at::empty({M, 16 * int64_t{chunks}}, x.options().dtype(at::kInt));
  at::Tensor x_sum = at::empty({M}, x.options().dtype(at::kInt));
  at::Tensor dequant = at::empty({M}, x.options().dtype(at::kFloat));

  const GemmParams params{reinterpret_cast<const int4*>(x_q.const_data_ptr<int>()), x_sum.const_data_ptr<int>(),
                          dequant.const_data_ptr<float>(), packed_c.const_data_ptr<uint8_t>(), M, N, row_bytes,
                          chunks};
  const bool vector_loads =
      row_bytes % kChunkBytes == 0 && reinterpret_cast<uintptr_t>(params.packed) % kChunkBytes == 0;
  const int64_t full = M / 8 * 8, rest = M - full;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bpt::ternary_linear", [&] {
    quantize_tokens<scalar_t><<<static_cast<unsigned int>(M), kQuantizeThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), K, chunks, scale_f.const_data_ptr<float>(), x_q.mutable_data_ptr<int>(),
        x_sum.mutable_data_ptr<int>(), dequant.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    if (full > 0) launch_gemm<scalar_t, 8>(params, 0, full, vector_loads, out, stream);
    if (rest == 1) launch_gemm<scalar_t, 1>(params, full, rest, vector_loads, out, stream);  // M == 1: the GEMV
    else if (rest == 2) launch_gemm<scalar_t, 2>(params, full, rest, vector_loads, out, stream);
    else if (rest > 2 && rest <= 4) launch_gemm<scalar_t, 4>(params, full, rest, vector_loads, out, stream);
    else if (rest > 4) launch_gemm<scalar_t, 8>(params, full, rest, vector_loads, out, stream);
  });
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CUDA, m) { m.impl("ternary_linear", &ternary_linear_cuda); }

}  // namespace bpt::ops
