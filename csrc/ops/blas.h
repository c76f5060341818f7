#pragma once
// Row-major GEMM on raw pointers for the blockwise kernels, where each block product is
// small enough that a dispatcher call per block would cost more than the math.
//
//   C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]
//
// A is stored [m, k] (lda), or [k, m] when trans_a; B is [k, n] (ldb), or [n, k] when
// trans_b; C is [m, n] (ldc). Calls the BLAS the torch wheel carries (MKL's sgemm_/dgemm_,
// single-threaded inside a parallel region) and falls back to at::addmm_out where the
// wheel exports none.

#include <cstdint>

namespace bpt::blas {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// The naive triple loop, for tests of the above.
void gemm_reference(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                    int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

}  // namespace bpt::blas
