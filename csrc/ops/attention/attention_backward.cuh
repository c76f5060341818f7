#pragma once
// The tiled attention backward's kernels (attention_backward.cu has the design and the launch).
// Also compiled as host C++ under tests/cpp/cuda_emulation.h, where tests/cpp/test_tiled_attention.cpp
// runs them on the CPU.

#include <cstddef>
#include <cstdint>

#include "csrc/ops/attention/attention_tiles.cuh"

namespace bpt::ops::tiles {

template <int D>
constexpr size_t backward_shared_bytes(size_t element) {
  // K, V, Q, dO tiles and P^T, dS^T in the input type; S^T, dP^T, lse, delta and each warp's
  // 16 x 16 staging tile in fp32; the rows' documents.
  return (2 * kKeys * D + 2 * kRows * D + 2 * kKeys * kProbStride) * element +
         (2 * kKeys * kScoreStride + 2 * kRows + kWarps * 256) * sizeof(float) + kRows * sizeof(int64_t);
}

// Writes a warp's 16 x 16 fp32 accumulator through its staging tile: row r, column c of the
// fragment goes to write(r, c, value), for lanes in turn.
template <typename Write>
__device__ __forceinline__ void store_fragment(const Accumulator& acc, float* stage, int lane, Write write) {
  nvcuda::wmma::store_matrix_sync(stage, acc, 16, nvcuda::wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 256; i += 32) write(i / 16, i % 16, stage[i]);
  __syncwarp();  // the stage is reused by the next fragment
}

// delta[r] = sum_d dO[r, d] O[r, d] - dL/dlse[r] in fp32, a warp per row: FlashAttention-2's
// preprocessing, without fp32 copies of dO and O.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_row_terms(const T* __restrict__ grad_out, const T* __restrict__ out, const float* __restrict__ grad_lse,
                      int64_t rows, int D, float* __restrict__ delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp
  float sum = 0.0f;
  for (int d = lane; d < D; d += 32) {
    sum += static_cast<float>(grad_out[row * D + d]) * static_cast<float>(out[row * D + d]);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) delta[row] = grad_lse == nullptr ? sum : sum - grad_lse[row];
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_backward_tiled(KernelParams p, const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const T* __restrict__ grad_out, const float* __restrict__ lse,
                             const float* __restrict__ delta, const int64_t* __restrict__ segment_ids,
                             float* __restrict__ grad_q, T* __restrict__ grad_k, T* __restrict__ grad_v) {
  namespace wmma = nvcuda::wmma;
  BPT_DYNAMIC_SHARED(shared);
  T* k_tile = reinterpret_cast<T*>(shared);
  T* v_tile = k_tile + kKeys * D;
  T* q_tile = v_tile + kKeys * D;
  T* do_tile = q_tile + kRows * D;
  T* p_tile = do_tile + kRows * D;         // P^T [keys][rows]
  T* ds_tile = p_tile + kKeys * kProbStride;  // dS^T [keys][rows]
  float* s_tile = reinterpret_cast<float*>(ds_tile + kKeys * kProbStride);  // S^T
  float* dp_tile = s_tile + kKeys * kScoreStride;                             // dP^T
  float* row_lse = dp_tile + kKeys * kScoreStride;
  float* row_delta = row_lse + kRows;
  float* stages = row_delta + kRows;  // 256 floats per warp
  int64_t* row_doc = reinterpret_cast<int64_t*>(stages + kWarps * 256);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* stage = stages + 256 * warp;

  const int64_t b = blockIdx.z, kv_head = b * p.kv_heads + blockIdx.y;
  const int64_t first_key = static_cast<int64_t>(blockIdx.x) * kKeys;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t* segments = segment_ids == nullptr ? nullptr : segment_ids + b * p.kv_len;

  load_tile<kKeys, D>(k_tile, k + kv_head * p.kv_len * D, first_key, p.kv_len);
  load_tile<kKeys, D>(v_tile, v + kv_head * p.kv_len * D, first_key, p.kv_len);

  Accumulator grad_k_acc[D / 16], grad_v_acc[D / 16];  // unrolled loops keep these in registers
#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    wmma::fill_fragment(grad_k_acc[n], 0.0f);
    wmma::fill_fragment(grad_v_acc[n], 0.0f);
  }

  // This lane's key (row of the transposed tiles) among the warp's 16: two lanes per key,
  // every other query each.
  const int key_row = 16 * warp + lane / 2, half = lane % 2;
  const int64_t key = first_key + key_row;
  const int64_t key_doc = document(segments, key, p.kv_len);
  // Causal: query i sees this tile's first key from position kv_offset + i >= first_key on.
  const int64_t first_query = p.causal && first_key > p.kv_offset ? first_key - p.kv_offset : 0;

  for (int64_t g = 0; g < group; ++g) {
    const int64_t head = (b * p.kv_heads + blockIdx.y) * group + g;
    for (int64_t first_row = first_query / kRows * kRows; first_row < p.q_len; first_row += kRows) {
      __syncthreads();  // the previous tile's readers of Q, dO and dS^T are done
      load_tile<kRows, D>(q_tile, q + head * p.q_len * D, first_row, p.q_len);
      load_tile<kRows, D>(do_tile, grad_out + head * p.q_len * D, first_row, p.q_len);
      for (int i = threadIdx.x; i < kRows; i += kThreads) {
        const int64_t row = first_row + i;
        row_lse[i] = row < p.q_len ? lse[head * p.q_len + row] : 0.0f;
        row_delta[i] = row < p.q_len ? delta[head * p.q_len + row] : 0.0f;
        row_doc[i] = row < p.q_len ? document(segments, p.kv_offset + row, p.kv_len) : 0;
      }
      __syncthreads();

      // S^T and dP^T (the warp's 16 keys x 64 rows): K and V row-major [keys, D]; Q and dO
      // row-major [rows, D] are Q^T and dO^T column-major, slice d starting 16 d elements on.
      for (int n = 0; n < kRows / 16; ++n) {
        Accumulator acc;
        wmma::fill_fragment(acc, 0.0f);
        mma_slices<T, wmma::row_major, wmma::col_major>(acc, k_tile + 16 * warp * D, D, 16, q_tile + 16 * n * D, D,
                                                        16, D / 16);
        wmma::store_matrix_sync(s_tile + 16 * warp * kScoreStride + 16 * n, acc, kScoreStride, wmma::mem_row_major);
        wmma::fill_fragment(acc, 0.0f);
        mma_slices<T, wmma::row_major, wmma::col_major>(acc, v_tile + 16 * warp * D, D, 16, do_tile + 16 * n * D, D,
                                                        16, D / 16);
        wmma::store_matrix_sync(dp_tile + 16 * warp * kScoreStride + 16 * n, acc, kScoreStride, wmma::mem_row_major);
      }
      __syncwarp();

      // P^T and dS^T on this lane's key, every other row.
      for (int c = half; c < kRows; c += 2) {
        const float prob = visible(p, first_row + c, row_doc[c], key, key_doc)
                               ? expf(s_tile[key_row * kScoreStride + c] * p.scale - row_lse[c])
                               : 0.0f;
        p_tile[key_row * kProbStride + c] = from_float<T>(prob);
        ds_tile[key_row * kProbStride + c] =
            from_float<T>(p.scale * prob * (dp_tile[key_row * kScoreStride + c] - row_delta[c]));
      }
      __syncwarp();

      // dV += P^T dO and dK += dS^T Q on the warp's keys: slice c of the rows is 16 c columns
      // of P^T and dS^T, 16 c rows (16 c D elements) of dO and Q. Each slice of P^T and dS^T
      // is loaded once for all D / 16 column blocks.
      for (int c = 0; c < kRows / 16; ++c) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_part, ds_part;
        wmma::load_matrix_sync(p_part, p_tile + 16 * warp * kProbStride + 16 * c, kProbStride);
        wmma::load_matrix_sync(ds_part, ds_tile + 16 * warp * kProbStride + 16 * c, kProbStride);
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> rows;
          wmma::load_matrix_sync(rows, do_tile + 16 * c * D + 16 * n, D);
          wmma::mma_sync(grad_v_acc[n], p_part, rows, grad_v_acc[n]);
          wmma::load_matrix_sync(rows, q_tile + 16 * c * D + 16 * n, D);
          wmma::mma_sync(grad_k_acc[n], ds_part, rows, grad_k_acc[n]);
        }
      }
      __syncthreads();  // every warp's keys of dS^T are written

      // dQ += dS K on rows 16w..16w+15: dS [rows, keys] is dS^T column-major (row r at column
      // r of dS^T); slice c of the keys is 16 c rows of dS^T and of K.
      for (int n = 0; n < D / 16; ++n) {
        Accumulator acc;
        wmma::fill_fragment(acc, 0.0f);
        mma_slices<T, wmma::col_major, wmma::row_major>(acc, ds_tile + 16 * warp, kProbStride, 16 * kProbStride,
                                                        k_tile + 16 * n, D, 16 * D, kKeys / 16);
        store_fragment(acc, stage, lane, [&](int r, int c, float value) {
          const int64_t row = first_row + 16 * warp + r;
          if (row < p.q_len) atomicAdd(grad_q + (head * p.q_len + row) * D + 16 * n + c, value);
        });
      }
    }
  }

#pragma unroll
  for (int n = 0; n < D / 16; ++n) {
    const auto write_to = [&](T* grad) {
      return [&, grad](int r, int c, float value) {
        const int64_t key_index = first_key + 16 * warp + r;
        if (key_index < p.kv_len) grad[(kv_head * p.kv_len + key_index) * D + 16 * n + c] = from_float<T>(value);
      };
    };
    store_fragment(grad_k_acc[n], stage, lane, write_to(grad_k));
    store_fragment(grad_v_acc[n], stage, lane, write_to(grad_v));
  }
}

}  // namespace bpt::ops::tiles
