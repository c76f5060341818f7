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
#include "csrc/ops/attention/attention_tiles.cuh"

namespace bpt::ops {
namespace {

using namespace tiles;

template <int D>
constexpr size_t shared_bytes(size_t element) {
  // Q, K, V tiles and P in the input type; S and O in fp32; m, l and the rescale per row.
  return (kRows * D + 2 * kKeys * D + kRows * kProbStride) * element +
         (kRows * kScoreStride + kRows * D + 3 * kRows) * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_tiled(KernelParams p, const T* __restrict__ q,
                                                                    const T* __restrict__ k, const T* __restrict__ v,
                                                                    const int64_t* __restrict__ segment_ids,
                                                                    T* __restrict__ out, float* __restrict__ lse) {
  namespace wmma = nvcuda::wmma;
  extern __shared__ __align__(32) unsigned char shared[];
  T* q_tile = reinterpret_cast<T*>(shared);
  T* k_tile = q_tile + kRows * D;
  T* v_tile = k_tile + kKeys * D;
  T* p_tile = v_tile + kKeys * D;
  float* s_tile = reinterpret_cast<float*>(p_tile + kRows * kProbStride);
  float* o_tile = s_tile + kRows * kScoreStride;
  float* row_max = o_tile + kRows * D;
  float* row_sum = row_max + kRows;
  float* row_rescale = row_sum + kRows;

  const int64_t b = blockIdx.z, h = blockIdx.y, head = b * p.q_heads + h;
  const int64_t kv_head = b * p.kv_heads + h / (p.q_heads / p.kv_heads);
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRows;
  const T* q_head = q + head * p.q_len * D;
  const T* k_head = k + kv_head * p.kv_len * D;
  const T* v_head = v + kv_head * p.kv_len * D;
  const int64_t* segments = segment_ids == nullptr ? nullptr : segment_ids + b * p.kv_len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
    const int64_t row = first_row + i / D;
    q_tile[i] = row < p.q_len ? q_head[row * D + i % D] : from_float<T>(0.0f);
    o_tile[i] = 0.0f;
  }
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
    for (int i = threadIdx.x; i < kKeys * D; i += kThreads) {
      const int64_t key = first_key + i / D;
      const bool real = key < p.kv_len;
      k_tile[i] = real ? k_head[key * D + i % D] : from_float<T>(0.0f);
      v_tile[i] = real ? v_head[key * D + i % D] : from_float<T>(0.0f);
    }
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
      const int64_t key = first_key + c;
      const bool seen = visible(p, query, query_doc, key, document(segments, key, p.kv_len));
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

template <typename T, int D>
void launch(const AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& segment_ids, const at::Tensor& out, const at::Tensor& lse) {
  const size_t bytes = shared_bytes<D>(sizeof(T));
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
  if (!enabled() || (dtype != at::kBFloat16 && dtype != at::kHalf) || (p.head_dim != 64 && p.head_dim != 128) ||
      p.q_len == 0 || p.batch * p.q_heads == 0 || p.q_heads > 65535 || p.batch > 65535) {
    return false;
  }
  const c10::cuda::CUDAGuard guard(q.device());
  // Built for sm_80 and sm_90a; the tiles need more shared memory than some cards allow a
  // block (99 KB on sm_86/89 is less than D = 128's).
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  const size_t needed = p.head_dim == 64 ? shared_bytes<64>(2) : shared_bytes<128>(2);
  if (device->major < 8 || device->sharedMemPerBlockOptin < needed) return false;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
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
