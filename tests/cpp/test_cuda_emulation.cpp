// tests/cpp/cuda_emulation.h, the host stand-in for CUDA that lets CI run kernel sources on
// the CPU: each emulated feature against a plain loop computing the same thing.

#include "tests/cpp/cuda_emulation.h"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace {

using bpt::emulation::launch;

// ids [grid.x * grid.y * grid.z * threads]: each thread's block-linear and thread-linear index.
__global__ void write_indices(int* ids) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  ids[block * threads + thread] = static_cast<int>(block * 1000 + thread);
}

// sums [blocks]: the sum of x's blockDim.x values of each block, by a tree in shared memory.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) block_sum(const float* __restrict__ x, float* __restrict__ sums) {
  __shared__ float partial[kThreads];
  const unsigned t = threadIdx.x;
  partial[t] = x[blockIdx.x * kThreads + t];
  __syncthreads();
  for (unsigned half = kThreads / 2; half > 0; half /= 2) {
    if (t < half) partial[t] += partial[t + half];
    __syncthreads();
  }
  if (t == 0) sums[blockIdx.x] = partial[0];
}

// Each lane's value summed over its warp by butterfly, int and float, and lane 5's broadcast.
__global__ void warp_sums(const int* values, int* int_sums, float* float_sums, int* broadcast) {
  const unsigned i = threadIdx.x;
  int s = values[i];
  float f = static_cast<float>(values[i]) * 0.5f;
  for (int offset = 16; offset > 0; offset /= 2) {
    s += __shfl_xor_sync(0xffffffffu, s, offset);
    f += __shfl_xor_sync(0xffffffffu, f, offset);
  }
  int_sums[i] = s;
  float_sums[i] = f;
  broadcast[i] = __shfl_sync(0xffffffffu, values[i], 5);
}

__global__ void count_into(int* count, float* total, int* histogram) {
  atomicAdd(count, 1);
  atomicAdd(total, 0.5f);
  atomicAdd(histogram + (blockIdx.x * blockDim.x + threadIdx.x) % 7, 1);
}

// c [32, 16] fp32 = a [32, 48] b [48, 16], a stored row-major (ALayout row_major) or
// transposed (col_major), b stored transposed, [16, 48] (col_major). Warp w makes rows 16w ...
template <typename T, typename ALayout>
__global__ void wmma_product(const T* a, const T* b_t, float* c) {
  namespace wmma = nvcuda::wmma;
  constexpr int kInner = 48;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int s = 0; s < kInner / 16; ++s) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a_part;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_part;
    if constexpr (std::is_same_v<ALayout, wmma::row_major>) {
      wmma::load_matrix_sync(a_part, a + 16 * warp * kInner + 16 * s, kInner);  // a [32, 48]
    } else {
      wmma::load_matrix_sync(a_part, a + 16 * s * 32 + 16 * warp, 32);  // a^T [48, 32]
    }
    wmma::load_matrix_sync(b_part, b_t + 16 * s, kInner);
    wmma::mma_sync(acc, a_part, b_part, acc);
  }
  wmma::store_matrix_sync(c + 16 * warp * 16, acc, 16, wmma::mem_row_major);
}

// The wmma test's operands, 32-byte aligned as WMMA requires.
template <typename T>
struct Operands {
  alignas(32) T a[32 * 48];
  alignas(32) T a_t[48 * 32];
  alignas(32) T b_t[16 * 48];
  alignas(32) float c[32 * 16];
};

__global__ void misaligned_load(const __half* p, unsigned ldm) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, p, ldm);
}

// Warp 2 of 4 returns at once; the rest meet at barriers and count the threads still running.
__global__ void early_exit(int* counts, int rounds) {
  if (threadIdx.x / 32 == 2) return;
  for (int r = 0; r < rounds; ++r) {
    const int alive = __syncthreads_count(1);
    if (threadIdx.x == 0) counts[r] = alive;
    __syncthreads();
  }
}

// votes [blocks * 4]: and / or / and / count over the block, from thread 0.
__global__ void votes(int* results) {
  const unsigned t = threadIdx.x;
  const int all_small = __syncthreads_and(t < blockDim.x);
  const int any_five = __syncthreads_or(t == 5);
  const int none_five = __syncthreads_and(t != 5);
  const int even = __syncthreads_count(t % 2 == 0);
  if (t == 0) {
    int* out = results + 4 * blockIdx.x;
    out[0] = all_small, out[1] = any_five, out[2] = none_five, out[3] = even;
  }
}

__global__ void throw_in_one(int* reached_end) {
  if (threadIdx.x == 37) throw std::runtime_error("thread 37 failed");
  for (int r = 0; r < 100; ++r) __syncthreads();
  atomicAdd(reached_end, 1);
}

__global__ void shuffle_from_exited(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void read_dynamic_shared(std::uintptr_t* address, float* first) {
  unsigned char* shared = ::bpt::emulation::dynamic_shared();
  if (threadIdx.x == 0) {
    *address = reinterpret_cast<std::uintptr_t>(shared);
    std::memcpy(first, shared, sizeof(float));
  }
  __syncthreads();
  shared[threadIdx.x] = 0;  // the next block must see 0xFF again
}

// Thread t writes byte t of the dynamic shared memory: past its end for t >= the launch's size.
__global__ void write_shared_byte_per_thread() { ::bpt::emulation::dynamic_shared()[threadIdx.x] = 0; }

__global__ void load_int4(const int4* address, int* out) { *out = __ldg(address).x; }

}  // namespace

TEST_CASE("emulated launch gives every thread of every block its own indices", "[cuda_emulation]") {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  std::vector<int> ids(12 * 24, -1);
  launch(grid, block, 0, write_indices, ids.data());
  for (int b = 0; b < 12; ++b) {
    for (int t = 0; t < 24; ++t) REQUIRE(ids[b * 24 + t] == b * 1000 + t);
  }
}

TEST_CASE("emulated __syncthreads orders a shared-memory tree reduction", "[cuda_emulation]") {
  constexpr int kThreads = 128, kBlocks = 3;
  std::vector<float> x(kThreads * kBlocks);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i * 7919 % 201) - 100);
  std::vector<float> sums(kBlocks, NAN);
  launch(dim3(kBlocks), dim3(kThreads), 0, block_sum<kThreads>, x.data(), sums.data());
  for (int b = 0; b < kBlocks; ++b) {
    // Integers: exact in any order of summation.
    const double want = std::accumulate(x.begin() + b * kThreads, x.begin() + (b + 1) * kThreads, 0.0);
    REQUIRE(sums[b] == want);
  }
}

TEST_CASE("emulated __shfl_xor_sync butterfly sums a warp, __shfl_sync broadcasts", "[cuda_emulation]") {
  constexpr int kThreads = 64;  // two warps, summed separately
  std::vector<int> values(kThreads);
  for (int i = 0; i < kThreads; ++i) values[i] = i * i - 3 * i + 1;
  std::vector<int> int_sums(kThreads), broadcast(kThreads);
  std::vector<float> float_sums(kThreads);
  launch(dim3(1), dim3(kThreads), 0, warp_sums, values.data(), int_sums.data(), float_sums.data(),
         broadcast.data());
  for (int i = 0; i < kThreads; ++i) {
    const int first = i / 32 * 32;
    const int want = std::accumulate(values.begin() + first, values.begin() + first + 32, 0);
    REQUIRE(int_sums[i] == want);
    REQUIRE(float_sums[i] == 0.5f * static_cast<float>(want));
    REQUIRE(broadcast[i] == values[first + 5]);
  }
}

TEST_CASE("emulated atomicAdd loses no update across blocks", "[cuda_emulation]") {
  constexpr int kBlocks = 16, kThreads = 96;
  int count = 0;
  float total = 0.0f;
  std::vector<int> histogram(7, 0);
  launch(dim3(kBlocks), dim3(kThreads), 0, count_into, &count, &total, histogram.data());
  REQUIRE(count == kBlocks * kThreads);
  REQUIRE(total == 0.5f * kBlocks * kThreads);
  std::vector<int> want(7, 0);
  for (int i = 0; i < kBlocks * kThreads; ++i) ++want[i % 7];
  REQUIRE(histogram == want);
}

TEMPLATE_TEST_CASE("emulated wmma multiplies 32x48 by 48x16 like the naive loop", "[cuda_emulation]",
                   __nv_bfloat16, __half) {
  using T = TestType;
  namespace wmma = nvcuda::wmma;
  auto ops = std::make_unique<Operands<T>>();
  // Small integers: every product and sum is exact, so the order of summation cannot matter.
  std::vector<float> a(32 * 48), b(48 * 16);
  for (int i = 0; i < 32 * 48; ++i) a[i] = static_cast<float>(i * 37 % 9) - 4.0f;
  for (int i = 0; i < 48 * 16; ++i) b[i] = static_cast<float>(i * 11 % 7) - 3.0f;
  for (int r = 0; r < 32; ++r) {
    for (int k = 0; k < 48; ++k) {
      ops->a[r * 48 + k] = T(a[r * 48 + k]);
      ops->a_t[k * 32 + r] = T(a[r * 48 + k]);
    }
  }
  for (int k = 0; k < 48; ++k) {
    for (int c = 0; c < 16; ++c) ops->b_t[c * 48 + k] = T(b[k * 16 + c]);
  }
  std::vector<float> want(32 * 16, 0.0f);
  for (int r = 0; r < 32; ++r) {
    for (int c = 0; c < 16; ++c) {
      for (int k = 0; k < 48; ++k) want[r * 16 + c] += a[r * 48 + k] * b[k * 16 + c];
    }
  }

  SECTION("a row_major") {
    launch(dim3(1), dim3(64), 0, wmma_product<T, wmma::row_major>, ops->a, ops->b_t, ops->c);
  }
  SECTION("a col_major") {
    launch(dim3(1), dim3(64), 0, wmma_product<T, wmma::col_major>, ops->a_t, ops->b_t, ops->c);
  }
  for (int i = 0; i < 32 * 16; ++i) REQUIRE(ops->c[i] == want[i]);
}

TEST_CASE("emulated wmma rejects misaligned tiles and bad leading dimensions", "[cuda_emulation]") {
  auto ops = std::make_unique<Operands<__half>>();
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(32), 0, misaligned_load, ops->a + 8, 48u),
                      Catch::Contains("32-byte aligned"));
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(32), 0, misaligned_load, ops->a, 20u),
                      Catch::Contains("multiple of 8"));
}

TEST_CASE("emulated __syncthreads does not wait for a warp that returned", "[cuda_emulation]") {
  constexpr int kRounds = 50;
  std::vector<int> counts(kRounds, -1);
  launch(dim3(2), dim3(128), 0, early_exit, counts.data(), kRounds);
  for (int r = 0; r < kRounds; ++r) REQUIRE(counts[r] == 96);
}

TEST_CASE("emulated __syncthreads_and / _or / _count vote over the block", "[cuda_emulation]") {
  std::vector<int> results(2 * 4, -1);
  launch(dim3(2), dim3(100), 0, votes, results.data());
  REQUIRE(results == std::vector<int>{1, 1, 0, 50, 1, 1, 0, 50});
}

TEST_CASE("an exception in one emulated thread comes out of launch", "[cuda_emulation]") {
  int reached_end = 0;
  REQUIRE_THROWS_WITH(launch(dim3(4), dim3(64), 0, throw_in_one, &reached_end), "thread 37 failed");
  // No thread passes a barrier once another has thrown, and later blocks do not run.
  REQUIRE(reached_end == 0);
  std::vector<int> out(32);
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(32), 0, shuffle_from_exited, out.data()), Catch::Contains("lane 3"));
  // And the emulator is usable again afterwards.
  std::vector<int> ids(24, -1);
  launch(dim3(2), dim3(12), 0, write_indices, ids.data());
  REQUIRE(ids[23] == 1011);
}

TEST_CASE("emulated dynamic shared memory is aligned and reads as NaN until written", "[cuda_emulation]") {
  std::uintptr_t address = 1;
  float first = 0.0f;
  for (int run = 0; run < 2; ++run) {  // the second launch's block sees 0xFF despite the first's writes
    launch(dim3(1), dim3(64), 256, read_dynamic_shared, &address, &first);
    REQUIRE(address % 128 == 0);
    REQUIRE(std::isnan(first));
  }
}

TEST_CASE("emulated launches catch writes past the dynamic shared memory and unaligned __ldg", "[cuda_emulation]") {
  launch(dim3(2), dim3(64), 64, write_shared_byte_per_thread);  // within: fine
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(65), 64, write_shared_byte_per_thread),
                      Catch::Contains("wrote past its 64 bytes of dynamic shared memory"));
  alignas(16) int words[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  int out = 0;
  launch(dim3(1), dim3(1), 0, load_int4, reinterpret_cast<const int4*>(words + 4), &out);
  REQUIRE(out == 5);
  REQUIRE_THROWS_WITH(launch(dim3(1), dim3(1), 0, load_int4, reinterpret_cast<const int4*>(words + 1), &out),
                      Catch::Contains("not aligned"));
}

TEST_CASE("emulated arithmetic intrinsics match their definitions", "[cuda_emulation]") {
  // Bytes, low first: a = 2, 127, -1 (255), -128 (128); b = -128 (128), -1 (255), 2, 127.
  const int a = static_cast<int>(0x80ff7f02u), b = static_cast<int>(0x7f02ff80u);
  REQUIRE(__dp4a(a, b, 10) == 10 + 2 * -128 + 127 * -1 + -1 * 2 + -128 * 127);  // -16631
  REQUIRE(__dp4a(static_cast<unsigned>(a), static_cast<unsigned>(b), 10u) ==
          10u + 2 * 128 + 127 * 255 + 255 * 2 + 128 * 127);  // 49417
  REQUIRE(__fdiv_rn(1.0f, 3.0f) == 1.0f / 3.0f);
  REQUIRE(__fadd_rn(__fmul_rn(1.0f / 3.0f, 3.0f), -1.0f) == (1.0f / 3.0f) * 3.0f - 1.0f);
  REQUIRE(__float_as_int(__int_as_float(0x7fc00001)) == 0x7fc00001);
  REQUIRE(__bfloat162float(__float2bfloat16(1.0f + 1.0f / 256)) == 1.0f);  // ties to even
  REQUIRE(__half2float(__float2half(65504.0f)) == 65504.0f);
  REQUIRE(std::isinf(expf(INFINITY)));
  REQUIRE(fmaxf(logf(1.0f), rintf(-0.5f)) == 0.0f);
}
