// Ternary GEMM on AVX512-VNNI (vpdpbusd), compiled with its own flags (see CMakeLists.txt)
// and called only when ternary_kernel_available(Avx512Vnni). Includes no ATen or standard
// template header: inline code compiled with these flags could be picked by the linker for
// code that runs on CPUs without them.
//
// Per 64-byte run of codes (256 weights of a row): one load; the four 2-bit fields come out
// as (p & 0x03), (p & 0x0C), (p >> 4 & 0x03), (p >> 4 & 0x0C), each multiplied with 64
// block-order activations by vpdpbusd (unsigned x signed bytes, four products summed per
// int32 lane). Fields 1 and 3 stay at 4 x code (one shift per run instead of three) and sum
// into their own accumulator, divided by 4 at the end: exact, every product being a multiple
// of 4, and far from overflow (a lane grows by at most 8192 per run). Register block: MR tokens
// x NR weight rows, 2 MR NR accumulators; the rows' codes are unpacked once for all MR tokens.

#include <immintrin.h>

#include "csrc/ops/bitlinear/ternary_gemm.h"

namespace bpt::cpu {
namespace {

// Register blocks live in registers only when their loops are fully unrolled, which GCC -O2
// does not do by itself.
#define BPT_UNROLL _Pragma("GCC unroll 16")

constexpr int kMaxTokens = 2;  // MR
constexpr int kRows = 4;       // NR
static_assert(kMaxTokens <= 2, "rows_block runs one micro_kernel<1, NR> for the remaining tokens");

// Not _mm512_reduce_add_epi32 or _mm512_castsi512_si256: GCC 12 warns inside them (-Wall).
inline int32_t reduce_add(__m512i v) {
  const __m256i half =
      _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xFF, v, 0), _mm512_maskz_extracti64x4_epi64(0xFF, v, 1));
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int MR, int NR>
void micro_kernel(int64_t k, const int8_t* x_blocked, int64_t ldx, const int32_t* x_sum, const uint8_t* packed,
                  int64_t ldp, int32_t* acc, int64_t ld_acc) {
  const int64_t row_bytes = ternary_packed_bytes(k);
  const int64_t full_runs = row_bytes / 64, runs = (row_bytes + 63) / 64;
  // The last run may be partial: codes past the row read as 0, their activations are zero padding.
  const __mmask64 tail_mask = row_bytes % 64 == 0 ? ~__mmask64(0) : (__mmask64(1) << (row_bytes % 64)) - 1;
  const __m512i field0 = _mm512_set1_epi8(0x03), field1 = _mm512_set1_epi8(0x0C);
  // sum1: fields 0 and 2 (codes); sum4: fields 1 and 3 (4 x codes).
  __m512i sum1[MR][NR], sum4[MR][NR];
  BPT_UNROLL
  for (int t = 0; t < MR; ++t)
    BPT_UNROLL
    for (int r = 0; r < NR; ++r) sum1[t][r] = sum4[t][r] = _mm512_setzero_si512();

  for (int64_t run = 0; run < runs; ++run) {
    const __mmask64 mask = run < full_runs ? ~__mmask64(0) : tail_mask;
    const int8_t* x = x_blocked + 256 * run;
    __m512i p[NR];
    BPT_UNROLL
    for (int r = 0; r < NR; ++r) p[r] = _mm512_maskz_loadu_epi8(mask, packed + r * ldp + 64 * run);
    BPT_UNROLL
    for (int half = 0; half < 2; ++half) {
      __m512i low[NR], high[NR];
      BPT_UNROLL
      for (int r = 0; r < NR; ++r) {
        const __m512i v = half == 0 ? p[r] : _mm512_srli_epi16(p[r], 4);
        low[r] = _mm512_and_si512(v, field0);
        high[r] = _mm512_and_si512(v, field1);
      }
      BPT_UNROLL
      for (int t = 0; t < MR; ++t) {
        const __m512i x_low = _mm512_loadu_si512(x + t * ldx + 128 * half);        // fields 0, 2
        const __m512i x_high = _mm512_loadu_si512(x + t * ldx + 128 * half + 64);  // fields 1, 3
        BPT_UNROLL
        for (int r = 0; r < NR; ++r) {
          sum1[t][r] = _mm512_dpbusd_epi32(sum1[t][r], low[r], x_low);
          sum4[t][r] = _mm512_dpbusd_epi32(sum4[t][r], high[r], x_high);
        }
      }
    }
  }
  BPT_UNROLL
  for (int t = 0; t < MR; ++t)
    BPT_UNROLL
    for (int r = 0; r < NR; ++r)
      acc[t * ld_acc + r] = reduce_add(sum1[t][r]) + reduce_add(sum4[t][r]) / 4 - x_sum[t];
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

void ternary_gemm_avx512vnni(int64_t m, int64_t n, int64_t k, const int8_t* x_blocked, const int32_t* x_sum,
                             const uint8_t* packed, int32_t* acc, int64_t ld_acc) {
  const int64_t ldx = ternary_blocked_stride(k), ldp = ternary_packed_bytes(k);
  int64_t j = 0;
  for (; j + kRows <= n; j += kRows)
    rows_block<kRows>(m, k, x_blocked, ldx, x_sum, packed + j * ldp, ldp, acc + j, ld_acc);
  for (; j < n; ++j) rows_block<1>(m, k, x_blocked, ldx, x_sum, packed + j * ldp, ldp, acc + j, ld_acc);
}

}  // namespace bpt::cpu
