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
#include "csrc/ops/attention/attention_tiles.cuh"

namespace bpt::ops {
namespace {

using namespace tiles;

template <int D>
constexpr size_t shared_bytes(size_t element) {
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
  for (int d = lane; d < D; d += 32) sum += static_cast<float>(grad_out[row * D + d]) * static_cast<float>(out[row * D + d]);
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
  extern __shared__ __align__(32) unsigned char shared[];
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

  for (int i = threadIdx.x; i < kKeys * D; i += kThreads) {
    const int64_t key = first_key + i / D;
    const bool real = key < p.kv_len;
    k_tile[i] = real ? k[(kv_head * p.kv_len + key) * D + i % D] : from_float<T>(0.0f);
    v_tile[i] = real ? v[(kv_head * p.kv_len + key) * D + i % D] : from_float<T>(0.0f);
  }

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
      for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
        const int64_t row = first_row + i / D;
        const bool real = row < p.q_len;
        q_tile[i] = real ? q[(head * p.q_len + row) * D + i % D] : from_float<T>(0.0f);
        do_tile[i] = real ? grad_out[(head * p.q_len + row) * D + i % D] : from_float<T>(0.0f);
      }
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

  const size_t bytes = shared_bytes<D>(sizeof(T));
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
  if (!enabled() || at::globalContext().deterministicAlgorithms() || (dtype != at::kBFloat16 && dtype != at::kHalf) || (p.head_dim != 64 && p.head_dim != 128) ||
      p.q_len == 0 || p.kv_len == 0 || p.batch * p.kv_heads == 0 || p.kv_heads > 65535 || p.batch > 65535) {
    return false;
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* device = at::cuda::getCurrentDeviceProperties();
  const size_t needed = p.head_dim == 64 ? shared_bytes<64>(2) : shared_bytes<128>(2);
  if (device->major < 8 || device->sharedMemPerBlockOptin < needed) return false;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor doc = grad_out.contiguous(), outc = out.contiguous();
  const at::Tensor glse = grad_lse.defined() ? grad_lse.to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor lsec = lse.to(at::kFloat).contiguous();
  const at::Tensor seg = p.has_segments ? segment_ids.to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor grad_q_sum = at::zeros({p.batch, p.q_heads, p.q_len, p.head_dim}, q.options().dtype(at::kFloat));
  grad_k = at::empty({p.batch, p.kv_heads, p.kv_len, p.head_dim}, k.options());
  grad_v = at::empty({p.batch, p.kv_heads, p.kv_len, p.head_dim}, v.options());
  dispatch_tiles(dtype, p.head_dim, [&](auto element, auto dim) {
    launch<decltype(element), dim()>(p, qc, kc, vc, doc, outc, glse, lsec, seg, grad_q_sum, grad_k, grad_v);
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
