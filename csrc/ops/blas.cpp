#include "csrc/ops/blas.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <climits>

// Fortran BLAS (LP64) as exported by libtorch_cpu on x86-64 wheels. Weak, so a torch build
// without them still links and uses the ATen fallback.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace bpt::blas {
namespace {

template <typename T>
using fortran_gemm = void(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                          const int*, const T*, const int*, const T*, T*, const int*);

// Column-major BLAS sees a row-major [r, c] matrix as its transpose, so row-major
// C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands and m, n.
template <typename T>
void fortran_row_major(fortran_gemm<T>* fn, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                       const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  TORCH_CHECK(m <= INT_MAX && n <= INT_MAX && k <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX && ldc <= INT_MAX,
              "bpt gemm: block of ", m, "x", n, "x", k, " exceeds 32-bit BLAS sizes");
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  // BLAS requires ld >= max(1, rows) even where a dimension is empty.
  const int LDA = static_cast<int>(std::max<int64_t>(ldb, 1)), LDB = static_cast<int>(std::max<int64_t>(lda, 1));
  const int LDC = static_cast<int>(std::max<int64_t>(ldc, 1));
  fn(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

template <typename T>
void aten_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
                    const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto dtype = std::is_same_v<T, float> ? at::kFloat : at::kDouble;
  const auto opts = at::TensorOptions().dtype(dtype);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    at::Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, opts);
    return trans ? t.t() : t;
  };
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::addmm_out(C, C, view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr) return fortran_row_major<float>(sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  aten_row_major<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (dgemm_ != nullptr) return fortran_row_major<double>(dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  aten_row_major<double>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm_reference(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                    int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0;
      for (int64_t p = 0; p < k; ++p) {
        sum += (trans_a ? a[p * lda + i] : a[i * lda + p]) * (trans_b ? b[j * ldb + p] : b[p * ldb + j]);
      }
      c[i * ldc + j] = alpha * sum + (beta == 0 ? 0 : beta * c[i * ldc + j]);
    }
  }
}

}  // namespace bpt::blas
