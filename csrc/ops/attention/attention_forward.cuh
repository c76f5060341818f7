#pragma once
// The tiled attention forward's kernel (attention_forward.cu has the design and the launch).
// Also compiled as host C++ under tests/cpp/cuda_emulation.h, where tests/cpp/test_tiled_attention.cpp
// runs it on the CPU.

#include <cstddef>
#include <cstdint>

#include "csrc/ops/attention/attention_tiles.cuh"

namespace bpt::ops::tiles {

template <int D>
constexpr size_t forward_shared_bytes(size_t element) {
  // Q, K, V tiles and P in the input type; S and O in fp32; m, l and the rescale per row; the
  // key tile's documents.
  return (kRows * D + 2 * kKeys * D + kRows * kProbStride) * element +
         (kRows * kScoreStride + kRows * D + 3 * kRows) * sizeof(float) + kKeys * sizeof(int64_t);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_tiled(KernelParams p, const T* __restrict__ q,
                                                                    const T* __restrict__ k, const T* __restrict__ v,
                                                                    const int64_t* __restrict__ segment_ids,
                                                                    T* __restrict__ out, float* __restrict__ lse) {
  namespace wmma = nvcuda::wmma;
  BPT_DYNAMIC_SHARED(shared);
  T* q_tile = reinterpret_cast<T*>(shared);
  T* k_tile = q_tile + kRows * D;
  T* v_tile = k_tile + kKeys * D;
  T* p_tile = v_tile + kKeys * D;
  float* s_tile = reinterpret_cast<float*>(p_tile + kRows * kProbStride);
  float* o_tile = s_tile + kRows * kScoreStride;
  float* row_max = o_tile + kRows * D;
  float* row_sum = row_max + kRows;
  float* row_rescale = row_sum + kRows;
  int64_t* key_doc = reinterpret_cast<int64_t*>(row_rescale + kRows);

  const int64_t b = blockIdx.z, h = blockIdx.y, head = b * p.q_heads + h;
  const int64_t kv_head = b * p.kv_heads + h / (p.q_heads / p.kv_heads);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRows;
  const T* q_head = q + head * p.q_len * D;
  const T* k_head = k + kv_head * p.kv_len * D;
  const T* v_head = v + kv_head * p.kv_len * D;
  const int64_t* segments = segment_ids == nullptr ? nullptr : segment_ids + b * p.kv_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile<kRows, D>(q_tile, q_head, first_row, p.q_len);
  for (int i = threadIdx.x; i < kRows * D; i += kThreads) o_tile[i] = 0.0f;
  for (int i = threadIdx.x; i < kRows; i += kThreads) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
  }
  __syncthreads();

  const int64_t last_row = (first_row + kRows < p.q_len ? first_row + kRows : p.q_len) - 1;
  const int64_t causal_end = p.kv_offset + last_row + 1;
  const int64_t key_end = p.causal && causal_end < p.kv_len ? causal_end : p.kv_len;
  // This lane's row of the warp's 16 (two lanes per row, every other key each).
  const int row = 16 * warp + lane / 2, half = lane % 2;
  const int64_t query = first_row + row;
  const int64_t query_doc = query < p.q_len ? document(segments, p.kv_offset + query, p.kv_len) : 0;

  for (int64_t first_key = 0; first_key < key_end; first_key += kKeys) {
    load_tile<kKeys, D>(k_tile, k_head, first_key, p.kv_len);
    load_tile<kKeys, D>(v_tile, v_head, first_key, p.kv_len);
    for (int c = threadIdx.x; c < kKeys; c += kThreads) key_doc[c] = document(segments, first_key + c, p.kv_len);
    __syncthreads();

    // S (the warp's 16 rows x 64 keys) = Q K^T: K row-major [keys, D] is K^T column-major,
    // and slice d of K^T's rows starts 16 d elements into each key's row.
    for (int n = 0; n < kKeys / 16; ++n) {
      Accumulator acc;
      wmma::fill_fragment(acc, 0.0f);
      mma_slices<T, wmma::row_major, wmma::col_major>(acc, q_tile + 16 * warp * D, D, 16, k_tile + 16 * n * D, D, 16,
                                                      D / 16);
      wmma::store_matrix_sync(s_tile + 16 * warp * kScoreStride + 16 * n, acc, kScoreStride, wmma::mem_row_major);
    }
    __syncwarp();

    // Scale, mask, and the online softmax of this lane's 32 keys of its row (every other one).
    float* scores = s_tile + row * kScoreStride;
    float tile_max = -INFINITY;
    for (int c = half; c < kKeys; c += 2) {
      const bool seen = visible(p, query, query_doc, first_key + c, key_doc[c]);
      const float s = seen ? scores[c] * p.scale : -INFINITY;
      scores[c] = s;
      tile_max = fmaxf(tile_max, s);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float old_max = row_max[row];
    const float new_max = fmaxf(old_max, tile_max);
    const float shift = new_max == -INFINITY ? 0.0f : new_max;  // nothing visible yet: exp(-inf) = 0
    float tile_sum = 0.0f;
    for (int c = half; c < kKeys; c += 2) {
      const float prob = expf(scores[c] - shift);
      p_tile[row * kProbStride + c] = from_float<T>(prob);
      tile_sum += prob;
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    __syncwarp();  // both lanes have read row_max
    if (half == 0) {
      const float rescale = expf(old_max - shift);
      row_rescale[row] = rescale;
      row_sum[row] = row_sum[row] * rescale + tile_sum;
      row_max[row] = new_max;
    }
    __syncwarp();

    // O = O * rescale + P V, on the warp's rows.
    for (int i = lane; i < 16 * D; i += 32) {
      const int r = 16 * warp + i / D;
      o_tile[r * D + i % D] *= row_rescale[r];
    }
    __syncwarp();
    // (Slice c of V's rows: keys 16 c .. 16 c + 15, 16 c D elements on.)
    for (int n = 0; n < D / 16; ++n) {
      Accumulator acc;
      wmma::load_matrix_sync(acc, o_tile + 16 * warp * D + 16 * n, D, wmma::mem_row_major);
      mma_slices<T, wmma::row_major, wmma::row_major>(acc, p_tile + 16 * warp * kProbStride, kProbStride, 16,
                                                      v_tile + 16 * n, D, 16 * D, kKeys / 16);
      wmma::store_matrix_sync(o_tile + 16 * warp * D + 16 * n, acc, D, wmma::mem_row_major);
    }
    __syncthreads();  // the next tile overwrites K and V
  }

  for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
    const int r = i / D;
    const int64_t query_row = first_row + r;
    if (query_row < p.q_len) {
      // (A row that saw no key, which the op's checks rule out, gives 0 as on the CPU.)
      const float sum = row_sum[r];
      out[(head * p.q_len + query_row) * D + i % D] = from_float<T>(sum > 0.0f ? o_tile[i] / sum : 0.0f);
    }
  }
  for (int r = threadIdx.x; r < kRows; r += kThreads) {
    const int64_t query_row = first_row + r;
    if (query_row < p.q_len) lse[head * p.q_len + query_row] = row_max[r] + logf(row_sum[r]);
  }
}

}  // namespace bpt::ops::tiles
