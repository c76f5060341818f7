#pragma once
// A bf16 x bf16 -> fp32 GEMM on AVX512-BF16 (vdpbf16ps), for the attention kernels' bf16
// path: ATen exports no bf16 GEMM with an fp32 result that a custom op can call per block.
//
// B is packed once ("VNNI" layout) so that each 32-bit lane holds a pair of rows:
//   packed[(p * n_pad + j) * 2 + e] = B[2p + e][j]   (zero where 2p + e >= k or j >= n),
// n_pad = bf16_packed_width(n). Then
//   C[m, n] (+)= A[m, k] (row-major bf16, lda) * B[k, n]        (C fp32, ldc)
// Values are bf16 bit patterns (uint16_t), so this header needs no ATen type.

#include <cstdint>

namespace bpt::cpu {

// True when this CPU runs AVX512-BF16 and ATen itself uses AVX-512 (ATEN_CPU_CAPABILITY
// set lower turns this path off too).
bool bf16_gemm_available();

// Columns of a packed B, padded to the kernel's column block.
constexpr int64_t bf16_packed_width(int64_t n) { return (n + 31) / 32 * 32; }
// Elements of a packed B for a k x n matrix.
constexpr int64_t bf16_packed_size(int64_t k, int64_t n) { return (k + 1) / 2 * bf16_packed_width(n) * 2; }

// Packs the k x n matrix B(r, c) = trans ? src[c * ld + r] : src[r * ld + c].
void bf16_pack(const uint16_t* src, int64_t ld, bool trans, int64_t k, int64_t n, uint16_t* packed);

void bf16_gemm(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b_packed, float* c,
               int64_t ldc, bool accumulate);

// fp32 -> bf16 (round to nearest even) on the AVX512-BF16 path:
// dst[r * ldd + c] = src[r * lds + c] for a rows x cols block ...
void bf16_convert(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd);
// ... and straight into the packed layout of the k x n matrix src[r * ld + c].
void bf16_pack_from_float(const float* src, int64_t ld, int64_t k, int64_t n, uint16_t* packed);

// The naive loop over the same packed layout, for tests.
void bf16_gemm_reference(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b_packed,
                         float* c, int64_t ldc, bool accumulate);

}  // namespace bpt::cpu
