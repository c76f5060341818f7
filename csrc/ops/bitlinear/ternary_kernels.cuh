#pragma once
// bpt::ternary_linear's CUDA kernels and their launch plan (ternary_linear.cu has the design
// and the op). Also compiled as host C++ under tests/cpp/cuda_emulation.h, where
// tests/cpp/test_ternary_kernels.cpp runs them on the CPU against the CPU op, bit for bit.

#include <algorithm>
#include <cstdint>

namespace bpt::ops::ternary_cuda {

constexpr int kQuantizeThreads = 256;
constexpr int kQuantizeWarps = kQuantizeThreads / 32;
constexpr int kGemmWarps = 4;  // per block of ternary_gemm
constexpr int kRowsPerWarp = 4;
constexpr int kChunkBytes = 16;  // code bytes per lane and step: 64 weights
constexpr int kGroupChunks = 32;  // chunks per group of the x_q layout: one warp step

// The int4 of token activations that go with code word j of chunk c (the layout of ternary_linear.cu's header).
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
  const int4* x_q;       // [tokens, 4 chunks] int4, ternary_linear.cu's layout
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
template <typename scalar_t, int kTokens, typename Launch>
void launch_gemm(Launch& launch, GemmParams p, int64_t first, int64_t count, bool vector_loads, scalar_t* y) {
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
    launch(grid, dim3(kGemmWarps * 32), ternary_gemm<scalar_t, kTokens, CodeLoad::Vector>, p, y);
  } else {
    launch(grid, dim3(kGemmWarps * 32), ternary_gemm<scalar_t, kTokens, CodeLoad::Bytes>, p, y);
  }
}

// Buffers of one ternary_linear call: x [M, K] contiguous, packed [N, row_bytes], scale (one
// float) and y [M, N]; x_q [M, 16 chunks], x_sum [M] and dequant [M] are scratch. M, N >= 1.
template <typename scalar_t>
struct TernaryLinearCall {
  const scalar_t* x;
  const uint8_t* packed;
  const float* scale;
  scalar_t* y;
  int* x_q;
  int* x_sum;
  float* dequant;
  int64_t M, N, K, row_bytes;
};

// Chunks of 16 code bytes per row.
inline int code_chunks(int64_t row_bytes) { return static_cast<int>((row_bytes + kChunkBytes - 1) / kChunkBytes); }

// The quantize step, then the GEMV (M == 1) or 8-token tiles and the rest, each kernel run as
// launch(grid, block, kernel, args...): a CUDA launch on a stream (ternary_linear.cu), or the
// CPU emulator's (tests/cpp/test_ternary_kernels.cpp).
template <typename scalar_t, typename Launch>
void run_ternary_linear(Launch&& launch, const TernaryLinearCall<scalar_t>& c) {
  const int chunks = code_chunks(c.row_bytes);
  launch(dim3(static_cast<unsigned int>(c.M)), dim3(kQuantizeThreads), quantize_tokens<scalar_t>, c.x, c.K, chunks,
         c.scale, c.x_q, c.x_sum, c.dequant);
  const GemmParams params{reinterpret_cast<const int4*>(c.x_q), c.x_sum, c.dequant, c.packed, c.M, c.N,
                          c.row_bytes, chunks};
  const bool vector_loads =
      c.row_bytes % kChunkBytes == 0 && reinterpret_cast<uintptr_t>(c.packed) % kChunkBytes == 0;
  const int64_t full = c.M / 8 * 8, rest = c.M - full;
  if (full > 0) launch_gemm<scalar_t, 8>(launch, params, 0, full, vector_loads, c.y);
  if (rest == 1) {
    launch_gemm<scalar_t, 1>(launch, params, full, rest, vector_loads, c.y);  // M == 1: the GEMV
  } else if (rest == 2) {
    launch_gemm<scalar_t, 2>(launch, params, full, rest, vector_loads, c.y);
  } else if (rest > 2 && rest <= 4) {
    launch_gemm<scalar_t, 4>(launch, params, full, rest, vector_loads, c.y);
  } else if (rest > 4) {
    launch_gemm<scalar_t, 8>(launch, params, full, rest, vector_loads, c.y);
  }
}

}  // namespace bpt::ops::ternary_cuda
