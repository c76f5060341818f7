// bpt::blas::gemm (the BLAS the kernels call per block) against its naive triple loop.

#include <ATen/ATen.h>
#include <catch2/catch.hpp>

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
