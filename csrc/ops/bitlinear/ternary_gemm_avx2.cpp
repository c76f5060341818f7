// Ternary GEMM on AVX2, compiled with its own flags (see CMakeLists.txt) and called only when
// ternary_kernel_available(Avx2). Includes no ATen or standard template header, for the
// reason given in ternary_gemm_avx512vnni.cpp.
//
// Each 64-byte run of codes is read as two 32-byte halves; the four 2-bit fields come out by
// shift + and; vpmaddubsw multiplies unsigned codes (0..2) by signed activations into int16 pairs
// (|2 * 2 * -128| = 512, no saturation); the eight pair sums of one run (two halves x four
// fields, at most 4096 in size) add up in int16, then vpmaddwd with ones widens them to int32.
// Register block: MR tokens x NR weight rows (MR = 1: GEMV is the case that matters, and
// more accumulators would spill from the 16 ymm registers).

#include <immintrin.h>

#include <cstring>

#include "csrc/ops/bitlinear/ternary_gemm.h"

namespace bpt::cpu {
namespace {

// Register blocks live in registers only when their loops are fully unrolled, which GCC -O2
// does not do by itself.
#define BPT_UNROLL _Pragma("GCC unroll 16")

constexpr int kMaxTokens = 1;  // MR
constexpr int kRows = 4;       // NR

inline int32_t reduce_add(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int MR, int NR>
void micro_kernel(int64_t k, const int8_t* x_blocked, int64_t ldx, const int32_t* x_sum, const uint8_t* packed,
                  int64_t ldp, int32_t* acc, int64_t ld_acc) {
  const int64_t row_bytes = ternary_packed_bytes(k);
  const int64_t full_runs = row_bytes / 64, runs = (row_bytes + 63) / 64;
  // AVX2 has no masked byte load: a partial last run is read from a copy padded with code 0
  // (its activations are zero padding).
  alignas(32) uint8_t tail[NR][64];
  if (runs != full_runs) {
    BPT_UNROLL
    for (int r = 0; r < NR; ++r) {
      std::memset(tail[r], 0, 64);
      std::memcpy(tail[r], packed + r * ldp + 64 * full_runs, row_bytes % 64);
    }
  }
  const __m256i low2 = _mm256_set1_epi8(0x03);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i sum[MR][NR];
  BPT_UNROLL
  for (int t = 0; t < MR; ++t)
    BPT_UNROLL
    for (int r = 0; r < NR; ++r) sum[t][r] = _mm256_setzero_si256();

  for (int64_t run = 0; run < runs; ++run) {
    const int8_t* x = x_blocked + 256 * run;
    __m256i pairs[MR][NR];
    BPT_UNROLL
    for (int t = 0; t < MR; ++t)
      BPT_UNROLL
      for (int r = 0; r < NR; ++r) pairs[t][r] = _mm256_setzero_si256();
    BPT_UNROLL
    for (int h = 0; h < 2; ++h) {
      __m256i p[NR];
      BPT_UNROLL
      for (int r = 0; r < NR; ++r) {
        const uint8_t* codes = run < full_runs ? packed + r * ldp + 64 * run : tail[r];
        p[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * h));
      }
      BPT_UNROLL
      for (int s = 0; s < 4; ++s) {
        __m256i codes[NR];
        BPT_UNROLL
        for (int r = 0; r < NR; ++r) codes[r] = _mm256_and_si256(_mm256_srli_epi16(p[r], 2 * s), low2);
        BPT_UNROLL
        for (int t = 0; t < MR; ++t) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + t * ldx + 64 * s + 32 * h));
          BPT_UNROLL
          for (int r = 0; r < NR; ++r)
            pairs[t][r] = _mm256_add_epi16(pairs[t][r], _mm256_maddubs_epi16(codes[r], xv));
        }
      }
    }
    BPT_UNROLL
    for (int t = 0; t < MR; ++t)
      BPT_UNROLL
      for (int r = 0; r < NR; ++r) sum[t][r] = _mm256_add_epi32(sum[t][r], _mm256_madd_epi16(pairs[t][r], ones));
  }
  BPT_UNROLL
  for (int t = 0; t < MR; ++t)
    BPT_UNROLL
    for (int r = 0; r < NR; ++r) acc[t * ld_acc + r] = reduce_add(sum[t][r]) - x_sum[t];
}

template <int NR>
void rows_block(int64_t m, int64_t k, const int8_t* x_blocked, int64_t ldx, const int32_t* x_sum,
                const uint8_t* packed, int64_t ldp, int32_t* acc, int64_t ld_acc) {
  int64_t t = 0;
  for (; t + kMaxTokens <= m; t += kMaxTokens)
    micro_kernel<kMaxTokens, NR>(k, x_blocked + t * ldx, ldx, x_sum + t, packed, ldp, acc + t * ld_acc, ld_acc);
  if (t < m) micro_kernel<1, NR>(k, x_blocked + t * ldx, ldx, x_sum + t, packed, ldp, acc + t * ld_acc, ld_acc);
}

}  // namespace

void ternary_gemm_avx2(int64_t m, int64_t n, int64_t k, const int8_t* x_blocked, const int32_t* x_sum,
                       const uint8_t* packed, int32_t* acc, int64_t ld_acc) {
  const int64_t ldx = ternary_blocked_stride(k), ldp = ternary_packed_bytes(k);
  int64_t j = 0;
  for (; j + kRows <= n; j += kRows)
    rows_block<kRows>(m, k, x_blocked, ldx, x_sum, packed + j * ldp, ldp, acc + j, ld_acc);
  for (; j < n; ++j) rows_block<1>(m, k, x_blocked, ldx, x_sum, packed + j * ldp, ldp, acc + j, ld_acc);
}

}  // namespace bpt::cpu
