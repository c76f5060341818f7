// bpt::ternary_linear's CUDA kernels (csrc/ops/bitlinear/ternary_kernels.cuh: the quantize
// step, the GEMV and the token-tile GEMM, with ternary_linear.cu's launch plan), compiled as
// host C++ and run on the CPU under tests/cpp/cuda_emulation.h, against the CPU op bit for bit.
// This checks the activation layout, the masked __dp4a fields, the sum correction, the shuffle
// reduce-scatter, both code-load paths and the tile remainders on every CI run; a GPU's own
// behaviour is for tests/python/test_cuda.py on a GPU.

#include "tests/cpp/cuda_emulation.h"  // first: CUDA's keywords, built-ins and intrinsics on the CPU

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>

#include "csrc/ops/bitlinear/ternary_kernels.cuh"
#include "csrc/ops/ops.h"

namespace {

namespace ternary_cuda = bpt::ops::ternary_cuda;

// ternary_linear(x [M, K], packed, scale) through the emulated kernels; packed may be a view
// whose rows are not 16-byte aligned (the byte path).
template <typename scalar_t>
at::Tensor emulated_ternary_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), row_bytes = packed.size(1);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor x_q = at::empty({M, 16 * int64_t{ternary_cuda::code_chunks(row_bytes)}}, at::kInt);
  at::Tensor x_sum = at::empty({M}, at::kInt), dequant = at::empty({M}, at::kFloat);
  const at::Tensor scale_f = scale.to(at::kFloat);
  const auto launch = [](dim3 grid, dim3 block, auto kernel, auto... args) {
    bpt::emulation::launch(grid, block, 0, kernel, args...);
  };
  ternary_cuda::run_ternary_linear<scalar_t>(
      launch, {x.const_data_ptr<scalar_t>(), packed.const_data_ptr<uint8_t>(), scale_f.const_data_ptr<float>(),
               y.mutable_data_ptr<scalar_t>(), x_q.mutable_data_ptr<int>(), x_sum.mutable_data_ptr<int>(),
               dequant.mutable_data_ptr<float>(), M, N, K, row_bytes});
  return y;
}

at::Tensor emulated(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  switch (x.scalar_type()) {
    case at::kFloat: return emulated_ternary_linear<float>(x, packed, scale);
    case at::kDouble: return emulated_ternary_linear<double>(x, packed, scale);
    case at::kBFloat16: return emulated_ternary_linear<c10::BFloat16>(x, packed, scale);
    case at::kHalf: return emulated_ternary_linear<c10::Half>(x, packed, scale);
    default: FAIL("no ternary kernel for " << x.scalar_type()); return {};
  }
}

// The same bits, NaN where the CPU op has NaN (any payload).
void require_same_bits(const at::Tensor& got, const at::Tensor& want) {
  REQUIRE(got.sizes() == want.sizes());
  REQUIRE(got.scalar_type() == want.scalar_type());
  const at::Tensor nan = want.isnan();
  REQUIRE(at::equal(got.isnan(), nan));
  const auto bits = want.element_size() == 2 ? at::kShort : want.element_size() == 4 ? at::kInt : at::kLong;
  const at::Tensor finite = nan.logical_not();
  INFO("differing outputs: " << got.view(bits).masked_select(finite).ne(want.view(bits).masked_select(finite)).sum());
  REQUIRE(at::equal(got.view(bits).masked_select(finite), want.view(bits).masked_select(finite)));
}

}  // namespace

TEST_CASE("ternary CUDA kernels on the CPU emulator equal the CPU op bit for bit", "[ternary][cuda_emulation]") {
  // M = 1: the GEMV; 2, 3, 7, 9, 11: tiles of 2, 4 and 8 with padding tokens, after a full
  // tile or alone; 19: two full tiles in one launch (blockIdx.y 0 and 1), then a rest of 3.
  // K a multiple of 64 (16-byte code loads) or not (byte loads); 2048 fills whole groups of 32
  // chunks of the activation layout, 2048 + 4 ends in a partial one. N = 21: a partial warp and
  // block of rows.
  at::manual_seed(0);
  for (const int64_t K : {1, 15, 64, 100, 2048, 2048 + 4}) {
    const auto [packed, scale] = bpt::ops::ternary_pack(at::randn({21, K}));
    for (const int64_t M : {1, 2, 3, 7, 9, 11, 19}) {
      for (const auto dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
        INFO("M " << M << ", K " << K << ", " << dtype);
        const at::Tensor x = at::randn({M, K}).to(dtype);
        require_same_bits(emulated(x, packed, scale), bpt::ops::ternary_linear(x, packed, scale, K));
      }
    }
  }
}

TEST_CASE("ternary CUDA kernels on the CPU emulator: non-finite and zero tokens, unaligned codes",
          "[ternary][cuda_emulation]") {
  at::manual_seed(1);
  const int64_t K = 192;
  const auto [packed, scale] = bpt::ops::ternary_pack(at::randn({13, K}));
  for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    INFO(dtype);
    at::Tensor x = at::randn({5, K}).to(dtype);
    x[0][7] = std::numeric_limits<double>::quiet_NaN();
    x[1][0] = std::numeric_limits<double>::infinity();
    x[2].zero_();   // scale 127 / 1e-5: outputs 0
    x[3][5] = 1e4;  // one large value: the rest of its token rounds to 0
    const at::Tensor want = bpt::ops::ternary_linear(x, packed, scale, K);
    REQUIRE(want[0].isnan().all().item<bool>());
    require_same_bits(emulated(x, packed, scale), want);
  }
  // Rows a multiple of 16 bytes, but one byte into their storage: the byte path.
  at::Tensor storage = at::zeros({packed.numel() + 1}, at::kByte);
  const at::Tensor shifted = storage.narrow(0, 1, packed.numel()).view(packed.sizes());
  shifted.copy_(packed);
  REQUIRE(reinterpret_cast<uintptr_t>(shifted.const_data_ptr()) % 16 != 0);
  for (const int64_t M : {1, 8, 13}) {
    const at::Tensor x = at::randn({M, K});
    require_same_bits(emulated(x, shifted, scale), bpt::ops::ternary_linear(x, packed, scale, K));
  }
}
