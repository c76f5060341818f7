// bf16 GEMM kernel on AVX512-BF16, compiled with its own flags (see CMakeLists.txt) and
// called only when bf16_gemm_available(). Deliberately includes no ATen header: inline
// functions from shared headers compiled with these flags could be picked by the linker
// for code that runs on CPUs without them.
//
// Register block: MR rows of A x 32 columns of C (two zmm per row, 2 * MR accumulators).
// Per pair of k: two loads of packed B, MR broadcasts of an A pair, 2 * MR vdpbf16ps.

#include <immintrin.h>

#include <cstring>

#include "csrc/ops/bf16_gemm.h"

namespace bpt::cpu {
namespace {

constexpr int kMaxRows = 8;

inline int32_t load_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int MR>
void micro_kernel(int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t n_pad, float* c,
                  int64_t ldc, int64_t n_valid, bool accumulate) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t full_pairs = k / 2;
  for (int64_t p = 0; p < full_pairs; ++p) {
    const uint16_t* bp = b + p * n_pad * 2;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(load_pair(a + r * lda + 2 * p));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
  }
  if (k % 2 != 0) {  // last row of B pairs with zeros; its A partner must be zero too
    const uint16_t* bp = b + full_pairs * n_pad * 2;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
    for (int r = 0; r < MR; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(a[r * lda + k - 1]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
    }
  }
  const __mmask16 m0 = n_valid >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n_valid) - 1);
  const __mmask16 m1 = n_valid >= 32 ? __mmask16(0xFFFF) : n_valid <= 16 ? __mmask16(0) : __mmask16((1u << (n_valid - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_maskz_loadu_ps(m0, cr));
      acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, acc[r][0]);
    _mm512_mask_storeu_ps(cr + 16, m1, acc[r][1]);
  }
}

using MicroKernel = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, int64_t,
                             bool);
constexpr MicroKernel kKernels[kMaxRows + 1] = {nullptr,          micro_kernel<1>, micro_kernel<2>,
                                                micro_kernel<3>,  micro_kernel<4>, micro_kernel<5>,
                                                micro_kernel<6>,  micro_kernel<7>, micro_kernel<8>};

// 16 floats -> 16 bf16 in the low halves of 32-bit lanes.
inline __m512i to_bf16_lanes(__m512 v) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)); }

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

}  // namespace

void bf16_convert(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = first_lanes(cols - c);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + r * lds + c));
      _mm256_mask_storeu_epi16(dst + r * ldd + c, m, (__m256i)v);
    }
  }
}

void bf16_pack_from_float(const float* src, int64_t ld, int64_t k, int64_t n, uint16_t* packed) {
  const int64_t n_pad = bf16_packed_width(n);
  for (int64_t p = 0; p < (k + 1) / 2; ++p) {
    const float* r0 = src + 2 * p * ld;
    const float* r1 = 2 * p + 1 < k ? r0 + ld : nullptr;
    uint16_t* out = packed + p * n_pad * 2;
    for (int64_t j = 0; j < n_pad; j += 16) {
      const __mmask16 m = j < n ? first_lanes(n - j) : __mmask16(0);
      const __m512i lo = to_bf16_lanes(_mm512_maskz_loadu_ps(m, r0 + j));
      const __m512i hi = r1 ? to_bf16_lanes(_mm512_maskz_loadu_ps(m, r1 + j)) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + j * 2, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

void bf16_gemm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b_packed, float* c,
               int64_t ldc, bool accumulate) {
  const int64_t n_pad = bf16_packed_width(n);
  // Column panels outer: a 32-column panel of B (k x 64 bytes) stays in L1 across A's rows.
  for (int64_t j0 = 0; j0 < n; j0 += 32) {
    const int64_t n_valid = n - j0 < 32 ? n - j0 : 32;
    for (int64_t i0 = 0; i0 < m; i0 += kMaxRows) {
      const int64_t rows = m - i0 < kMaxRows ? m - i0 : kMaxRows;
      kKernels[rows](k, a + i0 * lda, lda, b_packed + j0 * 2, n_pad, c + i0 * ldc + j0, ldc, n_valid, accumulate);
    }
  }
}

}  // namespace bpt::cpu
