// bpt::blas::gemm (the BLAS the kernels call per block) against its naive triple loop.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

#include "csrc/ops/bf16_gemm.h"
#include "csrc/ops/blas.h"
#include "tests/cpp/helpers.h"

TEST_CASE("gemm matches the naive loop for every transpose, with beta and leading dims", "[blas]") {
  at::manual_seed(0);
  const int64_t m = 7, n = 5, k = 9, ld_pad = 3;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      for (double beta : {0.0, 1.0}) {
        INFO("trans_a " << ta << " trans_b " << tb << " beta " << beta);
        // Stored with padded leading dimensions to check lda/ldb/ldc are honoured.
        const int64_t a_rows = ta ? k : m, a_cols = ta ? m : k, b_rows = tb ? n : k, b_cols = tb ? k : n;
        const at::Tensor a = at::randn({a_rows, a_cols + ld_pad}, at::kDouble);
        const at::Tensor b = at::randn({b_rows, b_cols + ld_pad}, at::kDouble);
        const at::Tensor c0 = at::randn({m, n + ld_pad}, at::kDouble);
        at::Tensor want = c0.clone(), got64 = c0.clone();
        bpt::blas::gemm_reference(ta, tb, m, n, k, 0.5, a.data_ptr<double>(), a_cols + ld_pad, b.data_ptr<double>(),
                                  b_cols + ld_pad, beta, want.data_ptr<double>(), n + ld_pad);
        bpt::blas::gemm(ta, tb, m, n, k, 0.5, a.data_ptr<double>(), a_cols + ld_pad, b.data_ptr<double>(),
                        b_cols + ld_pad, beta, got64.data_ptr<double>(), n + ld_pad);
        bpt::test::require_close(got64, want, 1e-12, 1e-12);

        const at::Tensor a32 = a.to(at::kFloat), b32 = b.to(at::kFloat);
        at::Tensor got32 = c0.to(at::kFloat);
        bpt::blas::gemm(ta, tb, m, n, k, 0.5f, a32.data_ptr<float>(), a_cols + ld_pad, b32.data_ptr<float>(),
                        b_cols + ld_pad, static_cast<float>(beta), got32.data_ptr<float>(), n + ld_pad);
        bpt::test::require_close(got32, want, 1e-5, 1e-5);
      }
    }
  }
}

TEST_CASE("bf16 gemm on packed operands matches its reference loop, odd sizes included", "[blas][bf16]") {
  at::manual_seed(1);
  // n = 20 and 70 leave 4 and 6 columns in a second 16-lane half; lda > k as the kernels use it.
  for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {7, 33, 9}, {19, 70, 128}, {8, 32, 64},
                         {9, 20, 31}}) {
    for (bool trans : {false, true}) {
      INFO("m " << m << " n " << n << " k " << k << " trans " << trans);
      const int64_t lda = k + 5;
      const at::Tensor a = at::randn({m, lda}).to(at::kBFloat16);
      const at::Tensor b = (trans ? at::randn({n, k}) : at::randn({k, n})).to(at::kBFloat16);
      std::vector<uint16_t> packed(bpt::cpu::bf16_packed_size(k, n));
      const auto* b_bits = reinterpret_cast<const uint16_t*>(b.const_data_ptr<at::BFloat16>());
      const auto* a_bits = reinterpret_cast<const uint16_t*>(a.const_data_ptr<at::BFloat16>());
      bpt::cpu::bf16_pack(b_bits, trans ? k : n, trans, k, n, packed.data());
      at::Tensor want = at::randn({m, n});
      const at::Tensor c0 = want.clone();
      bpt::cpu::bf16_gemm_reference(m, n, k, a_bits, lda, packed.data(), want.data_ptr<float>(), n, true);
      // The reference matches the plain product of the bf16 values.
      const at::Tensor product = at::mm(a.narrow(1, 0, k).to(at::kDouble), (trans ? b.t() : b).to(at::kDouble));
      bpt::test::require_close(want, c0 + product, 1e-4, 1e-4);
      if (!bpt::cpu::bf16_gemm_available()) {
        WARN("no AVX512-BF16 on this CPU: the vectorised bf16 kernel is not compared");
        continue;
      }
      at::Tensor got = c0.clone();
      bpt::cpu::bf16_gemm(m, n, k, a_bits, lda, packed.data(), got.data_ptr<float>(), n, true);
      bpt::test::require_close(got, want, 1e-5, 1e-4);
      // Packing straight from fp32 rounds exactly as converting first.
      if (!trans) {
        std::vector<uint16_t> packed_f(packed.size());
        const at::Tensor b_float = b.to(at::kFloat);
        bpt::cpu::bf16_pack_from_float(b_float.data_ptr<float>(), n, k, n, packed_f.data());
        REQUIRE(packed_f == packed);
      }
    }
  }
}
