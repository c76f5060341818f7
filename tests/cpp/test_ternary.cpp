// BitNet b1.58 inference: bpt::ternary_pack's format, the ternary GEMM kernels against the
// reference loop (bit for bit), and bpt::ternary_linear against fake quantization in fp64.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include <limits>
#include <string>
#include <vector>

#include "csrc/ops/bitlinear/ternary_gemm.h"
#include "csrc/ops/ops.h"
#include "tests/cpp/helpers.h"

namespace {

using bpt::cpu::TernaryKernel;

// The packed codes back to w_q [N, K] int8 with ATen bit ops, following the documented layout.
at::Tensor unpack(const at::Tensor& packed, int64_t K) {
  const at::Tensor shifts = at::arange(0, 8, 2, at::kByte);
  const at::Tensor codes = packed.unsqueeze(-1).bitwise_right_shift(shifts).bitwise_and(3);  // [N, bytes, 4]
  return codes.reshape({packed.size(0), -1}).to(at::kChar).sub(1);                               // [N, 4 bytes]
}

// BitNet b1.58's weight quantizer in ATen: scale = max(mean|W|, 1e-5), w_q = clamp(round(W / scale)).
std::pair<at::Tensor, at::Tensor> weight_quant(const at::Tensor& w) {
  const at::Tensor wf = w.to(at::kFloat);
  const at::Tensor scale = wf.abs().mean().clamp_min(1e-5);
  return {at::round(wf / scale).clamp(-1, 1), scale};
}

// Fake quantization in fp64: (x_q / s) (w_q scale)^T, x_q and s as BitNet's activation_quant in fp32.
at::Tensor fake_quant_linear(const at::Tensor& x, const at::Tensor& w) {
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor s = 127.0 / xf.abs().amax(-1, true).clamp_min(1e-5);
  const at::Tensor x_q = at::round(xf * s).clamp(-128, 127);
  const auto [w_q, scale] = weight_quant(w);
  return at::matmul(x_q.to(at::kDouble) / s.to(at::kDouble), (w_q.to(at::kDouble) * scale.item<double>()).t());
}

std::string kernel_name(TernaryKernel kernel) {
  switch (kernel) {
    case TernaryKernel::Reference: return "reference";
    case TernaryKernel::Avx2: return "avx2";
    case TernaryKernel::Avx512Vnni: return "avx512vnni";
  }
  return "?";
}

std::vector<TernaryKernel> available_simd_kernels() {
  std::vector<TernaryKernel> kernels;
  for (TernaryKernel k : {TernaryKernel::Avx2, TernaryKernel::Avx512Vnni}) {
    if (bpt::cpu::ternary_kernel_available(k)) kernels.push_back(k);
    else WARN("ternary kernel " << kernel_name(k) << " does not run here: not tested");
  }
  return kernels;
}

// Random codes in {0, 1, 2} for an [N, K] weight, the padding of each row's last byte 0b01.
at::Tensor random_packed(int64_t N, int64_t K) {
  const at::Tensor w_q = at::randint(-1, 2, {N, K}, at::kChar);
  return std::get<0>(bpt::ops::ternary_pack(w_q.to(at::kFloat)));  // mean|w_q| <= 1: round(w_q / mean) keeps signs
}

}  // namespace

TEST_CASE("ternary_pack stores w_q + 1 in two bits, element k at byte k/4 bit 2(k%4)", "[ternary]") {
  at::manual_seed(0);
  for (int64_t K : {1, 3, 4, 5, 63, 65, 1000}) {
    INFO("K = " << K);
    const at::Tensor w = at::randn({7, K});
    const auto [packed, scale] = bpt::ops::ternary_pack(w);
    REQUIRE(packed.scalar_type() == at::kByte);
    REQUIRE(packed.sizes() == at::IntArrayRef{7, (K + 3) / 4});
    REQUIRE(scale.scalar_type() == at::kFloat);
    REQUIRE(scale.dim() == 0);
    REQUIRE(scale.item<float>() == w.abs().mean().item<float>());

    const at::Tensor unpacked = unpack(packed, K);
    REQUIRE(at::equal(unpacked.slice(1, 0, K), weight_quant(w).first.to(at::kChar)));
    REQUIRE(at::all(unpacked.slice(1, K) == 0).item<bool>());  // padding encodes 0
    // No code 0b11 anywhere.
    REQUIRE(at::all(unpacked <= 1).item<bool>());
  }
}

TEST_CASE("ternary_pack: scale floors at 1e-5, bf16 and fp64 weights quantize from fp32", "[ternary]") {
  at::manual_seed(1);
  const auto [packed0, scale0] = bpt::ops::ternary_pack(at::zeros({2, 6}));
  REQUIRE(scale0.item<float>() == 1e-5f);
  REQUIRE(at::all(unpack(packed0, 6) == 0).item<bool>());

  const at::Tensor w = at::randn({5, 37});
  for (at::ScalarType dtype : {at::kBFloat16, at::kDouble}) {
    const at::Tensor wd = w.to(dtype);
    const auto [packed, scale] = bpt::ops::ternary_pack(wd);
    const auto [w_q, want_scale] = weight_quant(wd);
    REQUIRE(scale.item<float>() == want_scale.item<float>());
    REQUIRE(at::equal(unpack(packed, 37).slice(1, 0, 37), w_q.to(at::kChar)));
  }
}

TEST_CASE("ternary GEMM kernels equal the reference loop bit for bit", "[ternary]") {
  at::manual_seed(2);
  const std::vector<TernaryKernel> kernels = available_simd_kernels();
  for (int64_t K : {1, 3, 5, 63, 64, 65, 127, 129, 255, 256, 257, 1000}) {
    for (int64_t N : {1, 3, 7, 33}) {
      for (int64_t M : {1, 3, 17}) {
        INFO("M = " << M << ", N = " << N << ", K = " << K);
        const at::Tensor packed = random_packed(N, K);
        // The extremes included: -128 and 127 in every row.
        at::Tensor x_q = at::randint(-128, 128, {M, K}, at::kChar);
        x_q.select(1, 0).fill_(-128);
        x_q.select(1, K - 1).fill_(K > 1 ? 127 : -128);
        at::Tensor want = at::empty({M, N}, at::kInt);
        bpt::cpu::ternary_gemm_reference(M, N, K, x_q.const_data_ptr<int8_t>(), packed.const_data_ptr<uint8_t>(),
                                         want.mutable_data_ptr<int32_t>());
        // The reference itself, against ATen's integer matmul of the unpacked codes.
        REQUIRE(at::equal(want, at::matmul(x_q.to(at::kLong), unpack(packed, K).slice(1, 0, K).to(at::kLong).t())
                                    .to(at::kInt)));
        for (TernaryKernel kernel : kernels) {
          INFO("kernel " << kernel_name(kernel));
          at::Tensor got = at::full({M, N}, -7, at::kInt);
          bpt::cpu::ternary_gemm(M, N, K, x_q.const_data_ptr<int8_t>(), packed.const_data_ptr<uint8_t>(),
                                 got.mutable_data_ptr<int32_t>(), kernel);
          REQUIRE(at::equal(got, want));
        }
      }
    }
  }
}

TEST_CASE("ternary GEMM kernels split over threads equal the reference on a large product", "[ternary]") {
  at::manual_seed(3);
  const int64_t M = 5, N = 1001, K = 4099;  // hundreds of row tasks, a ragged last one
  const at::Tensor packed = random_packed(N, K);
  const at::Tensor x_q = at::randint(-128, 128, {M, K}, at::kChar);
  at::Tensor want = at::empty({M, N}, at::kInt);
  bpt::cpu::ternary_gemm_reference(M, N, K, x_q.const_data_ptr<int8_t>(), packed.const_data_ptr<uint8_t>(),
                                   want.mutable_data_ptr<int32_t>());
  for (TernaryKernel kernel : available_simd_kernels()) {
    INFO("kernel " << kernel_name(kernel));
    at::Tensor got = at::empty({M, N}, at::kInt);
    bpt::cpu::ternary_gemm(M, N, K, x_q.const_data_ptr<int8_t>(), packed.const_data_ptr<uint8_t>(),
                           got.mutable_data_ptr<int32_t>(), kernel);
    REQUIRE(at::equal(got, want));
  }
}

TEST_CASE("ternary_linear equals fake quantization in fp64", "[ternary]") {
  at::manual_seed(4);
  for (int64_t K : {1, 3, 5, 63, 65, 127, 129, 1000}) {
    for (int64_t N : {1, 7, 33}) {
      INFO("N = " << N << ", K = " << K);
      const at::Tensor w = at::randn({N, K});
      const auto [packed, scale] = bpt::ops::ternary_pack(w);
      for (int64_t M : {1, 3, 17}) {
        const at::Tensor x = at::randn({M, K});
        const at::Tensor y = bpt::ops::ternary_linear(x, packed, scale, K);
        REQUIRE(y.scalar_type() == at::kFloat);
        bpt::test::require_close(y, fake_quant_linear(x, w), 1e-4, 1e-6);
      }
    }
  }
}

TEST_CASE("ternary_linear keeps leading dims and x's dtype (bf16, fp16, fp64)", "[ternary]") {
  at::manual_seed(5);
  const at::Tensor w = at::randn({19, 70});
  const auto [packed, scale] = bpt::ops::ternary_pack(w);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kDouble}) {
    const at::Tensor x = at::randn({2, 3, 70}).to(dtype);
    const at::Tensor y = bpt::ops::ternary_linear(x, packed, scale, 70);
    REQUIRE(y.scalar_type() == dtype);
    REQUIRE(y.sizes() == at::IntArrayRef{2, 3, 19});
    // Quantized from x as given (upcast to fp32); only the final rounding to dtype differs.
    const double rtol = dtype == at::kDouble ? 1e-4 : dtype == at::kHalf ? 2e-3 : 8e-3;
    bpt::test::require_close(y, fake_quant_linear(x, w).to(dtype), rtol, 1e-3);
  }
  // Non-contiguous x.
  const at::Tensor xt = at::randn({70, 4}).t();
  bpt::test::require_close(bpt::ops::ternary_linear(xt, packed, scale, 70), fake_quant_linear(xt, w), 1e-4, 1e-6);
}

TEST_CASE("ternary_linear rounds activations half to even, as torch.round", "[ternary]") {
  // Identity weight: w_q = I, scale = 1/K, so y * s / scale gives x_q back. With max|x| = 127,
  // s = 1 and x_q = round(x): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -3.5 -> -4.
  const at::Tensor x = at::tensor({127.0f, 0.5f, 1.5f, 2.5f, -0.5f, -3.5f, -127.0f}).unsqueeze(0);
  const auto [packed, scale] = bpt::ops::ternary_pack(at::eye(7));
  const at::Tensor y = bpt::ops::ternary_linear(x, packed, scale, 7);
  const at::Tensor x_q = at::round(y / scale);
  REQUIRE(at::equal(x_q, at::tensor({127.0f, 0.0f, 2.0f, 2.0f, 0.0f, -4.0f, -127.0f}).unsqueeze(0)));
}

TEST_CASE("ternary_linear: a token holding NaN or inf gives NaN, the others are unaffected", "[ternary]") {
  at::manual_seed(6);
  const at::Tensor w = at::randn({5, 40});
  const auto [packed, scale] = bpt::ops::ternary_pack(w);
  at::Tensor x = at::randn({3, 40});
  x.index_put_({0, 3}, std::numeric_limits<float>::quiet_NaN());
  x.index_put_({2, 9}, std::numeric_limits<float>::infinity());
  const at::Tensor y = bpt::ops::ternary_linear(x, packed, scale, 40);
  REQUIRE(at::all(at::isnan(y[0])).item<bool>());
  REQUIRE(at::all(at::isnan(y[2])).item<bool>());
  bpt::test::require_close(y[1], fake_quant_linear(x[1], w), 1e-4, 1e-6);
}

TEST_CASE("ternary ops on Meta tensors give shapes only", "[ternary]") {
  const at::Tensor w = at::empty({11, 9}, at::kMeta);
  const auto [packed, scale] = bpt::ops::ternary_pack(w);
  REQUIRE(packed.sizes() == at::IntArrayRef{11, 3});
  REQUIRE(packed.scalar_type() == at::kByte);
  REQUIRE(scale.dim() == 0);
  const at::Tensor y = bpt::ops::ternary_linear(at::empty({2, 4, 9}, at::device(at::kMeta).dtype(at::kBFloat16)),
                                                packed, scale, 9);
  REQUIRE(y.sizes() == at::IntArrayRef{2, 4, 11});
  REQUIRE(y.scalar_type() == at::kBFloat16);
}

TEST_CASE("ternary_linear runs on inputs that require grad but has no gradient", "[ternary]") {
  const auto [packed, scale] = bpt::ops::ternary_pack(at::randn({4, 8}).requires_grad_());
  REQUIRE_FALSE(scale.requires_grad());
  const at::Tensor x = at::randn({2, 8}).requires_grad_();
  const at::Tensor y = bpt::ops::ternary_linear(x, packed, scale, 8);
  REQUIRE_THROWS_WITH(y.sum().backward(), Catch::Contains("has no gradient (inference only)"));
}

TEST_CASE("ternary ops reject bad arguments with a message naming them", "[ternary]") {
  const at::Tensor w = at::randn({6, 10});
  const auto [packed, scale] = bpt::ops::ternary_pack(w);
  const at::Tensor x = at::randn({3, 10});
  using Catch::Contains;
  REQUIRE_THROWS_WITH(bpt::ops::ternary_pack(at::randn({10})), Contains("weight must be [N, K] (2-D)"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_pack(at::ones({2, 2}, at::kInt)), Contains("weight must be float32"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed, scale, 13), Contains("packed.size(1) must be 4"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed, scale, 9), Contains("x.size(-1) must be 9"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed.to(at::kChar), scale, 10), Contains("packed must be uint8"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed.flatten(), scale, 10),
                      Contains("packed must be [N, ceil(in_features / 4)] (2-D)"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed, at::ones({2}), 10), Contains("scale must hold one value"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed, scale.to(at::kInt), 10), Contains("scale must be float32"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x.to(at::kInt), packed, scale, 10), Contains("x must be float32"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed, scale, -1), Contains("in_features must be >= 0"));
  REQUIRE_THROWS_WITH(bpt::ops::ternary_linear(x, packed.to(at::kMeta), scale, 10),
                      Contains("packed must be on x's device"));
}
