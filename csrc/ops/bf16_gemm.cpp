// The parts of bf16_gemm.h that need no special instructions: the CPU check, packing and
// the reference loop. The vectorised kernel is bf16_gemm_avx512bf16.cpp.

#include "csrc/ops/bf16_gemm.h"

#include <cstring>

#include "csrc/ops/cpu_capability.h"

namespace bpt::cpu {
namespace {

float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
}

}  // namespace

bool bf16_gemm_available() {
  static const bool available = capability() == Capability::Avx512 && __builtin_cpu_supports("avx512bf16");
  return available;
}

void bf16_pack(const uint16_t* src, int64_t ld, bool trans, int64_t k, int64_t n, uint16_t* packed) {
  const int64_t n_pad = bf16_packed_width(n), pairs = (k + 1) / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    uint16_t* row = packed + p * n_pad * 2;
    for (int64_t j = 0; j < n_pad; ++j) {
      for (int64_t e = 0; e < 2; ++e) {
        const int64_t r = 2 * p + e;
        row[j * 2 + e] = (r < k && j < n) ? (trans ? src[j * ld + r] : src[r * ld + j]) : uint16_t(0);
      }
    }
  }
}

void bf16_gemm_reference(int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b_packed,
                         float* c, int64_t ldc, bool accumulate) {
  const int64_t n_pad = bf16_packed_width(n);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0;
      for (int64_t r = 0; r < k; ++r) {
        sum += bf16_to_float(a[i * lda + r]) * bf16_to_float(b_packed[((r / 2) * n_pad + j) * 2 + r % 2]);
      }
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum;
    }
  }
}

}  // namespace bpt::cpu
