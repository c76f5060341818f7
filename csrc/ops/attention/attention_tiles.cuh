#pragma once
// What the tiled tensor-core attention kernels share (attention_forward.cuh,
// attention_backward.cuh): tile sizes, the WMMA product of tile slices, conversions, and the
// opt-in switch. Both kernels cover bf16/fp16 inputs with head dims 64 and 128 on sm_80 and
// later, and leave anything else to the generic ATen blocks of attention_generic.cpp.

#include <c10/core/ScalarType.h>
#ifndef BPT_CUDA_EMULATION  // tests/cpp/cuda_emulation.h stands in for these on the CPU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

// A kernel's dynamic shared memory, as `unsigned char name[]` (32-byte aligned for WMMA).
#ifdef BPT_CUDA_EMULATION
#define BPT_DYNAMIC_SHARED(name) unsigned char* name = ::bpt::emulation::dynamic_shared()
#else
#define BPT_DYNAMIC_SHARED(name) extern __shared__ __align__(32) unsigned char name[]
#endif

namespace bpt::ops::tiles {

constexpr int kRows = 64;  // query rows per tile
constexpr int kKeys = 64;  // keys per tile
// Row strides of the fp32 score tiles and the 16-bit probability tiles, padded past 64 (and
// still multiples of 16 bytes, as WMMA wants) so that the 16 rows the lane pairs of a warp
// read and write start in 8 different shared-memory banks: a 2-way conflict, not 16-way.
constexpr int kScoreStride = kKeys + 4;
constexpr int kProbStride = kKeys + 8;
constexpr int kWarps = 4;  // 16 rows (or keys) of a 64-tile each
constexpr int kThreads = 32 * kWarps;

// The shapes and options a kernel reads, from the op's AttentionParams.
struct KernelParams {
  int64_t q_heads, kv_heads, q_len, kv_len, kv_offset;
  bool causal;
  float scale;
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half(x); }

using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// acc (16 x 16) += A B over `slices` 16-wide slices of the inner dimension: A of layout
// ALayout at a (leading dimension lda; slice s starts a_step s elements on), B of layout
// BLayout at b (leading dimension ldb; slice s starts b_step s elements on).
template <typename T, typename ALayout, typename BLayout>
__device__ __forceinline__ void mma_slices(Accumulator& acc, const T* a, int lda, int a_step, const T* b, int ldb,
                                           int b_step, int slices) {
  namespace wmma = nvcuda::wmma;
  for (int s = 0; s < slices; ++s) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a_part;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b_part;
    wmma::load_matrix_sync(a_part, a + a_step * s, lda);
    wmma::load_matrix_sync(b_part, b + b_step * s, ldb);
    wmma::mma_sync(acc, a_part, b_part, acc);
  }
}

// Rows [first, first + kTileRows) of a row-major [len, D] matrix of 16-bit elements into a
// shared tile [kTileRows, D], zeros past len: 16-byte loads and stores (D / 8 per row), spread
// over the block's threads. src and tile 16-byte aligned (the launchers check src).
template <int kTileRows, int D, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* __restrict__ src, int64_t first, int64_t len) {
  static_assert(sizeof(T) == 2 && D % 8 == 0, "16-bit elements, rows of whole 16-byte vectors");
  constexpr int kVectors = D / 8;  // per row
  for (int i = threadIdx.x; i < kTileRows * kVectors; i += kThreads) {
    const int r = i / kVectors, c = i % kVectors;
    const int64_t row = first + r;
    reinterpret_cast<int4*>(tile + r * D)[c] =
        row < len ? __ldg(reinterpret_cast<const int4*>(src + row * D) + c) : make_int4(0, 0, 0, 0);
  }
}

// The document of key position `pos`: 0 without segment ids, or past the keys.
__device__ __forceinline__ int64_t document(const int64_t* segments, int64_t pos, int64_t kv_len) {
  return segments != nullptr && pos < kv_len ? segments[pos] : 0;
}

// Whether key `key` (document key_doc) is visible to query row `query` (position
// kv_offset + query, document query_doc): inside both lengths, not after the query when
// causal, in the same document.
__device__ __forceinline__ bool visible(const KernelParams& p, int64_t query, int64_t query_doc, int64_t key,
                                        int64_t key_doc) {
  return query < p.q_len && key < p.kv_len && (!p.causal || key <= p.kv_offset + query) && query_doc == key_doc;
}

// BPT_CUDA_ATTENTION=tiled, read once per process: the tiled kernels are opt-in until a GPU
// run has passed tests/python/test_cuda.py with them.
inline bool enabled() {
  static const bool on = [] {
    const char* choice = std::getenv("BPT_CUDA_ATTENTION");
    return choice != nullptr && std::strcmp(choice, "tiled") == 0;
  }();
  return on;
}

// Whether the tiled kernels are switched on and built for dtype and head_dim (the four
// instantiations of dispatch_tiles).
inline bool tiles_cover(c10::ScalarType dtype, int64_t head_dim) {
  return enabled() && (dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half) &&
         (head_dim == 64 || head_dim == 128);
}

// Calls launch(T{}, std::integral_constant<int, D>{}) with the tile kernels' element type T for
// dtype (bf16, else fp16) and D for head_dim (64, else 128): the four instantiations.
template <typename Launch>
void dispatch_tiles(c10::ScalarType dtype, int64_t head_dim, Launch&& launch) {
  const auto with_dim = [&](auto element) {
    if (head_dim == 64) {
      launch(element, std::integral_constant<int, 64>{});
    } else {
      launch(element, std::integral_constant<int, 128>{});
    }
  };
  if (dtype == c10::ScalarType::BFloat16) {
    with_dim(__nv_bfloat16{});
  } else {
    with_dim(__half{});
  }
}

// Whether every tensor's data starts 16-byte aligned, as load_tile's vectors need (a view with
// a storage offset may not); false leaves the call to the generic blocks.
template <typename... Tensors>
bool aligned_for_tiles(const Tensors&... tensors) {
  return ((reinterpret_cast<uintptr_t>(tensors.const_data_ptr()) % 16 == 0) && ...);
}

}  // namespace bpt::ops::tiles
