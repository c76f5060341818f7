#pragma once
// CUDA kernel sources as host C++: so CI, which has no GPU, can run the kernels' index math,
// masking, barriers and arithmetic on the CPU and compare them with the reference loops.
//
// Include this header before a kernel source (.cuh, or .cu body) and compile it with g++ as
// C++20 with -pthread and -ffp-contract=off (so that float expressions round like separate
// IEEE operations; the __f*_rn intrinsics below never contract regardless). Launch kernels with
// bpt::emulation::launch(grid, block, dynamic_shared_bytes, kernel, args...).
//
// What is emulated:
//   - keywords: __global__, __device__, __host__, __forceinline__, __launch_bounds__(...),
//     __align__(n), __shared__ (a function-local static: one block runs at a time, and every
//     thread of it sees the same object, as on the GPU);
//   - built-ins: threadIdx, blockIdx, blockDim, gridDim (thread_local), warpSize, dim3, uint3,
//     int4, uint4, make_int4, make_uint4; __nv_bfloat16 and __half as c10::BFloat16 / c10::Half
//     and their float conversions;
//   - intrinsics: __syncthreads(_count/_and/_or), __syncwarp, __shfl_sync, __shfl_xor_sync,
//     atomicAdd, __dp4a, __fadd_rn / __fmul_rn / __fdiv_rn, __int_as_float, __float_as_int,
//     __ldg; expf, logf, fmaxf, rintf, INFINITY ... come from <cmath>;
//   - nvcuda::wmma 16x16x16 fragments, loads, stores, mma_sync (products exact, float sums);
//   - dynamic shared memory, through bpt::emulation::dynamic_shared() (a 128-byte aligned
//     buffer filled with 0xFF before each block, so uninitialised fp32 reads as NaN).
// Each block runs as blockDim threads (std::thread) that meet at real barriers: one for the
// block, one per warp. Blocks run one after another, x fastest; launches are serialised.
//
// What is not emulated:
//   - the memory model: shared and global memory are ordinary host memory, ordered only by the
//     barriers and atomics; a race that a GPU happens to tolerate is a C++ data race here;
//   - warp lockstep: lanes run independently between __syncwarp / shuffles, so code that
//     relies on implicit warp-synchronous execution (no __syncwarp) is wrong here, as it is
//     on Volta and later;
//   - partial warp masks: every live lane of a warp must take part in each __syncwarp and
//     shuffle (the mask is checked to name the calling lane, and for shuffles the source lane;
//     otherwise it is ignored);
//   - real WMMA fragment layouts: every lane holds the whole 16x16 tile (x[r * 16 + c]), so
//     element-wise fragment code works, but code that assumes which lane holds which element
//     does not; store_matrix_sync writes from lane 0 only, so other lanes must __syncwarp
//     before reading the stored tile (real WMMA requires the same);
//   - timing, occupancy, bank conflicts, register limits of __launch_bounds__, the dynamic
//     shared memory limit of the device, streams, and the order in which atomics land;
//   - `extern __shared__` arrays: declare dynamic shared memory with a macro that expands to
//     `unsigned char* name = ::bpt::emulation::dynamic_shared()` under BPT_CUDA_EMULATION;
//   - fresh static shared memory per block: a __shared__ variable starts at zero and keeps the
//     previous block's (and launch's) contents, where a GPU gives garbage.
// A thread that throws (a kernel's own check, or one of the emulator's: WMMA alignment, shuffle
// sources, launch configuration) stops its block: the other threads unwind at their next
// barrier and launch() rethrows the first exception. Barriers that threads of one block reach
// in different orders (divergent __syncthreads) deadlock, as they may on a GPU.
// Emulation is slow (a thread per CUDA thread; mma_sync is 4096 multiply-adds per lane): keep
// test shapes to a handful of tiles.

#ifdef __CUDACC__
#error "cuda_emulation.h is for host compilers; nvcc has the real thing"
#endif

#ifndef BPT_CUDA_EMULATION
#define BPT_CUDA_EMULATION 1
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if FLT_EVAL_METHOD != 0
#error "cuda_emulation.h needs float arithmetic in float precision (SSE, not x87)"
#endif
#ifdef __FAST_MATH__
#error "cuda_emulation.h: -ffast-math changes the IEEE behaviour the kernels rely on"
#endif

// ---- Keywords ------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// GCC's attribute rather than alignas: CUDA writes `__shared__ __align__(16) T x[n]`, and
// alignas may not stand between `static` and the type.
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

// ---- Built-in types and variables ------------------------------------------------------------

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

struct __align__(16) int4 {
  int x, y, z, w;
};
struct __align__(16) uint4 {
  unsigned int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;

inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16(x); }  // round to nearest even
inline __half __float2half(float x) { return __half(x); }                      // round to nearest even
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline float __half2float(__half x) { return static_cast<float>(x); }

// ---- Per-block state -----------------------------------------------------------------------

namespace bpt::emulation {
namespace detail {

// Thrown at a barrier in the other threads of a block once one thread has thrown, so that
// they unwind instead of computing on; launch() reports the first exception only.
struct BlockAborted {};

struct Warp {
  explicit Warp(unsigned lanes) : barrier(lanes) {
    for (unsigned l = 0; l < 32; ++l) live[l] = l < lanes;
  }
  std::barrier<> barrier;
  std::array<std::uint64_t, 32> slots{};  // a shuffle's values, one per lane
  std::array<std::atomic<bool>, 32> live;  // false past the warp's end and once a lane returned
};

struct Block {
  // Runs once per phase of the block barrier, before any thread leaves it: publishes the
  // __syncthreads_count tally of that phase (0 for a plain __syncthreads).
  struct PublishVote {
    Block* block;
    void operator()() noexcept { block->vote_result = block->vote_pending.exchange(0, std::memory_order_relaxed); }
  };

  Block(dim3 grid, dim3 dim, uint3 index, unsigned char* shared)
      : grid(grid), dim(dim), index(index), dynamic_shared(shared), barrier(dim.x * dim.y * dim.z, PublishVote{this}) {
    const unsigned threads = dim.x * dim.y * dim.z;
    for (unsigned first = 0; first < threads; first += 32) {
      warps.push_back(std::make_unique<Warp>(std::min(32u, threads - first)));
    }
  }

  void fail(std::exception_ptr error) {
    std::lock_guard lock(error_mutex);
    if (!first_error) first_error = error;
    aborted.store(true);
  }

  dim3 grid, dim;
  uint3 index;
  unsigned char* dynamic_shared;
  std::atomic<int> vote_pending{0};
  int vote_result = 0;
  std::barrier<PublishVote> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::atomic<bool> aborted{false};
  std::mutex error_mutex;
  std::exception_ptr first_error;
};

struct ThreadContext {
  Block* block;
  Warp* warp;
  unsigned lane;
};

inline thread_local ThreadContext* current = nullptr;

inline ThreadContext& context(const char* what) {
  if (current == nullptr) {
    throw std::logic_error(std::string(what) + " called outside bpt::emulation::launch");
  }
  return *current;
}

// A barrier crossing that unwinds when another thread of the block has thrown.
template <typename Barrier>
void cross(Barrier& barrier, const Block& block) {
  if (block.aborted.load()) throw BlockAborted{};
  barrier.arrive_and_wait();
  if (block.aborted.load()) throw BlockAborted{};
}

inline void check_mask(unsigned mask, unsigned lane, const char* what) {
  if ((mask >> lane & 1u) == 0) {
    throw std::logic_error(std::string(what) + ": the mask does not name the calling lane " + std::to_string(lane));
  }
}

// A float that the compiler cannot fuse with the operation around it.
inline float opaque(float x) {
  volatile float stored = x;
  return stored;
}

}  // namespace detail

// The current block's dynamic shared memory (128-byte aligned; 0xFF bytes at block start).
inline unsigned char* dynamic_shared() { return detail::context("dynamic_shared").block->dynamic_shared; }

}  // namespace bpt::emulation

// ---- Barriers, votes, shuffles -------------------------------------------------------------

inline void __syncthreads() {
  auto& ctx = bpt::emulation::detail::context("__syncthreads");
  bpt::emulation::detail::cross(ctx.block->barrier, *ctx.block);
}

// __syncthreads, returning how many live threads passed a nonzero predicate.
inline int __syncthreads_count(int predicate) {
  auto& ctx = bpt::emulation::detail::context("__syncthreads_count");
  if (predicate != 0) ctx.block->vote_pending.fetch_add(1, std::memory_order_relaxed);
  bpt::emulation::detail::cross(ctx.block->barrier, *ctx.block);
  return ctx.block->vote_result;  // stable until this thread arrives at the next barrier
}
inline int __syncthreads_or(int predicate) { return __syncthreads_count(predicate) != 0; }
inline int __syncthreads_and(int predicate) { return __syncthreads_count(predicate == 0) == 0; }

// Every live lane of the warp must call it (see the header comment on masks).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  auto& ctx = bpt::emulation::detail::context("__syncwarp");
  bpt::emulation::detail::check_mask(mask, ctx.lane, "__syncwarp");
  bpt::emulation::detail::cross(ctx.warp->barrier, *ctx.block);
}

namespace bpt::emulation::detail {

// Each lane posts its value, the warp meets, each lane reads lane source(lane), the warp meets
// again (so no slot is overwritten before it is read). source returns the lane itself to keep
// its own value.
template <typename T, typename Source>
T exchange(unsigned mask, T value, Source source, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  auto& ctx = context(what);
  check_mask(mask, ctx.lane, what);
  Warp& warp = *ctx.warp;
  std::memcpy(&warp.slots[ctx.lane], &value, sizeof(T));
  cross(warp.barrier, *ctx.block);
  const unsigned from = source(ctx.lane);
  if (from != ctx.lane) {
    if ((mask >> from & 1u) == 0 || !warp.live[from].load()) {
      throw std::logic_error(std::string(what) + ": lane " + std::to_string(ctx.lane) + " reads lane " +
                             std::to_string(from) + ", which is not in the mask or not running");
    }
    std::memcpy(&value, &warp.slots[from], sizeof(T));
  }
  cross(warp.barrier, *ctx.block);
  return value;
}

}  // namespace bpt::emulation::detail

// The value of lane (lane ^ lane_mask); a lane whose partner lies in a later group of `width`
// lanes keeps its own value, as in CUDA.
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return bpt::emulation::detail::exchange(
      mask, value,
      [=](unsigned lane) {
        const unsigned partner = lane ^ static_cast<unsigned>(lane_mask);
        const unsigned group_end = (lane / width + 1) * width;
        return partner < group_end && partner < 32 ? partner : lane;
      },
      "__shfl_xor_sync");
}

// The value of lane src_lane of the caller's group of `width` lanes.
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return bpt::emulation::detail::exchange(
      mask, value, [=](unsigned lane) { return lane / width * width + static_cast<unsigned>(src_lane) % width; },
      "__shfl_sync");
}

// ---- Atomics and arithmetic ----------------------------------------------------------------

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline int atomicAdd(int* address, int value) {
  return std::atomic_ref<int>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_add(value, std::memory_order_relaxed);
}

// c + the dot product of a's and b's four bytes, as signed (int) or unsigned bytes; wraps
// around like the hardware.
inline int __dp4a(int a, int b, int c) {
  unsigned int sum = static_cast<unsigned int>(c);
  for (int i = 0; i < 4; ++i) {
    const int product = static_cast<std::int8_t>(a >> 8 * i) * static_cast<std::int8_t>(b >> 8 * i);
    sum += static_cast<unsigned int>(product);
  }
  return static_cast<int>(sum);
}
inline unsigned int __dp4a(unsigned int a, unsigned int b, unsigned int c) {
  for (int i = 0; i < 4; ++i) c += (a >> 8 * i & 0xffu) * (b >> 8 * i & 0xffu);
  return c;
}

// One IEEE operation, rounded to nearest even, never fused into an FMA.
inline float __fadd_rn(float a, float b) {
  using bpt::emulation::detail::opaque;
  return opaque(opaque(a) + opaque(b));
}
inline float __fmul_rn(float a, float b) {
  using bpt::emulation::detail::opaque;
  return opaque(opaque(a) * opaque(b));
}
inline float __fdiv_rn(float a, float b) {
  using bpt::emulation::detail::opaque;
  return opaque(opaque(a) / opaque(b));
}

inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }

template <typename T>
T __ldg(const T* address) {
  if (reinterpret_cast<std::uintptr_t>(address) % alignof(T) != 0) {
    throw std::logic_error("__ldg: address not aligned to its type's " + std::to_string(alignof(T)) + " bytes");
  }
  return *address;
}

// ---- WMMA ----------------------------------------------------------------------------------

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Every lane holds the whole tile: element (r, c) of the 16 x 16 matrix is x[r * 16 + c]
// (for matrix_b, r indexes K). The Layout of a and b only says how loads read memory.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulated WMMA covers 16x16x16 only");
  using element_type = T;
  static constexpr int num_elements = 256;
  element_type x[num_elements];
};

namespace detail {

// Real WMMA leaves these undefined; here they fail loudly. Checked in every build type, as CI
// builds with NDEBUG and the check costs nothing next to the emulation.
template <typename T>
void check_tile(const void* pointer, unsigned ldm, const char* what) {
#ifndef BPT_CUDA_EMULATION_NO_WMMA_CHECKS
  if (reinterpret_cast<std::uintptr_t>(pointer) % 32 != 0) {
    throw std::logic_error(std::string(what) + ": the tile pointer must be 32-byte aligned");
  }
  if (ldm * sizeof(T) % 16 != 0) {
    throw std::logic_error(std::string(what) + ": ldm " + std::to_string(ldm) + " must be a multiple of " +
                           std::to_string(16 / sizeof(T)) + " elements (16 bytes)");
  }
#endif
}

// The memory offset of element (r, c) of a tile.
inline std::size_t offset(int r, int c, unsigned ldm, bool row_major) {
  return row_major ? std::size_t(r) * ldm + c : std::size_t(c) * ldm + r;
}

}  // namespace detail

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const std::type_identity_t<T>& value) {
  for (auto& e : f.x) e = value;
}

// matrix_a / matrix_b: element (r, c) at p[r * ldm + c] (row_major) or p[c * ldm + r] (col_major).
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const std::type_identity_t<T>* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "matrix_a / matrix_b fragments need a row_major or col_major layout");
  detail::check_tile<T>(p, ldm, "load_matrix_sync");
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = p[detail::offset(r, c, ldm, std::is_same_v<Layout, row_major>)];
  }
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const std::type_identity_t<T>* p, unsigned ldm,
                      layout_t layout) {
  detail::check_tile<T>(p, ldm, "load_matrix_sync");
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = p[detail::offset(r, c, ldm, layout == mem_row_major)];
  }
}

// Lane 0 alone writes (every lane holds the same tile): __syncwarp before other lanes read it.
template <typename T>
void store_matrix_sync(std::type_identity_t<T>* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                       layout_t layout) {
  detail::check_tile<T>(p, ldm, "store_matrix_sync");
  const auto* ctx = bpt::emulation::detail::current;
  if (ctx != nullptr && ctx->lane != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) p[detail::offset(r, c, ldm, layout == mem_row_major)] = f.x[r * 16 + c];
  }
}

// d = a b + c, each product float(a) float(b) (exact for 16-bit inputs) summed in float onto c;
// d may be c.
template <typename T, typename LayoutA, typename LayoutB, typename Acc>
void mma_sync(fragment<accumulator, 16, 16, 16, Acc>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b, const fragment<accumulator, 16, 16, 16, Acc>& c) {
  float a_float[256], b_float[256], sums[256];
  for (int i = 0; i < 256; ++i) {
    a_float[i] = static_cast<float>(a.x[i]);
    b_float[i] = static_cast<float>(b.x[i]);
    sums[i] = static_cast<float>(c.x[i]);
  }
  for (int r = 0; r < 16; ++r) {  // each sum takes its products in order of k
    for (int k = 0; k < 16; ++k) {
      for (int n = 0; n < 16; ++n) sums[r * 16 + n] += a_float[r * 16 + k] * b_float[k * 16 + n];
    }
  }
  for (int i = 0; i < 256; ++i) d.x[i] = static_cast<Acc>(sums[i]);
}

}  // namespace nvcuda::wmma

// ---- Launch --------------------------------------------------------------------------------

namespace bpt::emulation {
namespace detail {

// One launch at a time in the process: __shared__ statics belong to the kernel, not a launch.
inline std::mutex& launch_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline void check_launch(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    throw std::logic_error("bpt::emulation::launch: invalid configuration, grid (" + std::to_string(grid.x) + ", " +
                           std::to_string(grid.y) + ", " + std::to_string(grid.z) + "), block (" +
                           std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                           std::to_string(block.z) + ")");
  }
}

// Thread `linear` of the block: waits for the whole block to be started, runs the kernel, and
// leaves both barriers however it ends, so the threads still running do not wait for it.
inline void run_thread(Block& block, unsigned linear, std::latch& started, const std::function<void()>& kernel) {
  Warp& warp = *block.warps[linear / 32];
  ThreadContext ctx{&block, &warp, linear % 32};
  current = &ctx;
  threadIdx = {linear % block.dim.x, linear / block.dim.x % block.dim.y, linear / (block.dim.x * block.dim.y)};
  blockIdx = block.index;
  blockDim = block.dim;
  gridDim = block.grid;
  started.wait();
  try {
    if (!block.aborted.load()) kernel();
  } catch (const BlockAborted&) {
  } catch (...) {
    block.fail(std::current_exception());
  }
  warp.live[ctx.lane].store(false);
  warp.barrier.arrive_and_drop();
  block.barrier.arrive_and_drop();
  current = nullptr;
}

inline void run_block(Block& block, const std::function<void()>& kernel) {
  const unsigned threads = block.dim.x * block.dim.y * block.dim.z;
  std::latch started(1);
  std::vector<std::thread> workers;
  workers.reserve(threads);
  try {
    for (unsigned t = 0; t < threads; ++t) {
      workers.emplace_back(run_thread, std::ref(block), t, std::ref(started), std::cref(kernel));
    }
  } catch (...) {  // could not start every thread: the started ones leave without running
    block.fail(std::current_exception());
  }
  started.count_down();
  for (auto& w : workers) w.join();
}

struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t{128}); }
};

}  // namespace detail

// Runs kernel(args...) over the grid: blocks one after another (x fastest, then y, z), each
// as blockDim threads. Rethrows the first exception a thread of a block threw, after the block.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes, Kernel kernel, Args... args) {
  detail::check_launch(grid, block);
  std::lock_guard lock(detail::launch_mutex());
  // Guard bytes after the buffer catch a kernel that uses more than its launch asked for.
  constexpr std::size_t kGuard = 4096;
  constexpr unsigned char kGuardByte = 0xA5;
  const std::size_t bytes = std::max<std::size_t>(dynamic_shared_bytes, 1);
  std::unique_ptr<unsigned char[], detail::AlignedDelete> shared(new (std::align_val_t{128})
                                                                     unsigned char[bytes + kGuard]);
  const std::function<void()> body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(shared.get(), 0xFF, bytes);
        std::memset(shared.get() + bytes, kGuardByte, kGuard);
        detail::Block state(grid, block, uint3{x, y, z}, shared.get());
        detail::run_block(state, body);
        if (state.first_error) std::rethrow_exception(state.first_error);
        if (std::any_of(shared.get() + bytes, shared.get() + bytes + kGuard,
                        [](unsigned char b) { return b != kGuardByte; })) {
          throw std::logic_error("a kernel wrote past its " + std::to_string(dynamic_shared_bytes) +
                                 " bytes of dynamic shared memory");
        }
      }
    }
  }
}

}  // namespace bpt::emulation
