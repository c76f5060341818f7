// The parts of ternary_gemm.h that need no special instructions: the CPU checks, the
// reference loop, block-order activations and the parallel driver. The vectorised kernels
// are ternary_gemm_avx2.cpp and ternary_gemm_avx512vnni.cpp, each built with its own flags.

#include "csrc/ops/bitlinear/ternary_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "csrc/ops/cpu_capability.h"

namespace bpt::cpu {

bool ternary_kernel_available(TernaryKernel kernel) {
  static const bool avx2 = capability() != Capability::Default && __builtin_cpu_supports("avx2");
  static const bool avx512vnni = capability() == Capability::Avx512 && __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512vnni");
  switch (kernel) {
    case TernaryKernel::Reference: return true;
    case TernaryKernel::Avx2: return avx2;
    case TernaryKernel::Avx512Vnni: return avx512vnni;
  }
  return false;
}

TernaryKernel ternary_best_kernel() {
  static const TernaryKernel best = ternary_kernel_available(TernaryKernel::Avx512Vnni) ? TernaryKernel::Avx512Vnni
                                    : ternary_kernel_available(TernaryKernel::Avx2)     ? TernaryKernel::Avx2
                                                                                        : TernaryKernel::Reference;
  return best;
}

void ternary_gemm_reference(int64_t m, int64_t n, int64_t k, const int8_t* x_q, const uint8_t* packed,
                            int32_t* acc) {
  const int64_t row_bytes = ternary_packed_bytes(k);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      int32_t sum = 0;
      for (int64_t c = 0; c < k; ++c) {
        const int code = (packed[j * row_bytes + c / 4] >> (2 * (c % 4))) & 3;
        sum += int32_t(x_q[i * k + c]) * (code - 1);
      }
      acc[i * n + j] = sum;
    }
  }
}

void ternary_quantize_activations(int64_t m, int64_t k, const float* x, int8_t* x_q, float* s) {
  // Adding and subtracting 1.5 * 2^23 rounds a float to an integer, ties to even, exactly for
  // |v| < 2^22; |x * s| <= 127 (1 + 2^-23) here. Exact as long as the product is rounded
  // before the add: no -ffast-math, and no FMA (this file is built for baseline x86-64).
  constexpr float kRoundMagic = 12582912.0f;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = x + i * k;
      int8_t* qr = x_q + i * k;
      float amax = 0.0f;
      bool finite = true;
      for (int64_t c = 0; c < k; ++c) {
        const float a = std::fabs(xr[c]);
        amax = std::max(amax, a);
        finite &= a <= std::numeric_limits<float>::max();  // false for inf and NaN
      }
      if (!finite) {
        s[i] = std::numeric_limits<float>::quiet_NaN();
        std::memset(qr, 0, k);
        continue;
      }
      const float scale = 127.0f / std::max(amax, 1e-5f);
      s[i] = scale;
      for (int64_t c = 0; c < k; ++c) {
        const float v = (xr[c] * scale + kRoundMagic) - kRoundMagic;
        qr[c] = static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, v)));
      }
    }
  });
}

void ternary_block_activations(int64_t m, int64_t k, const int8_t* x_q, int8_t* x_blocked, int32_t* x_sum) {
  const int64_t stride = ternary_blocked_stride(k);
  for (int64_t i = 0; i < m; ++i) {
    const int8_t* x = x_q + i * k;
    int8_t* xb = x_blocked + i * stride;
    std::memset(xb, 0, stride);
    int32_t sum = 0;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t b = c / 256, j = (c % 256) / 4, s = c % 4;
      xb[256 * b + 64 * s + j] = x[c];
      sum += x[c];
    }
    x_sum[i] = sum;
  }
}

void ternary_gemm(int64_t m, int64_t n, int64_t k, const int8_t* x_q, const uint8_t* packed, int32_t* acc,
                  TernaryKernel kernel) {
  TORCH_CHECK(ternary_kernel_available(kernel), "ternary_gemm: the requested kernel does not run on this CPU");
  if (m == 0 || n == 0) return;
  if (kernel == TernaryKernel::Reference) {
    ternary_gemm_reference(m, n, k, x_q, packed, acc);
    return;
  }
  std::vector<int8_t> x_blocked(m * ternary_blocked_stride(k));
  std::vector<int32_t> x_sum(m);
  ternary_block_activations(m, k, x_q, x_blocked.data(), x_sum.data());
  const auto simd = kernel == TernaryKernel::Avx512Vnni ? &ternary_gemm_avx512vnni : &ternary_gemm_avx2;

  // Tasks of 16 weight rows (a multiple of every kernel's row block); a thread gets at least
  // about 256 KB of packed weights times tokens, so small products stay on one thread.
  constexpr int64_t kRowsPerTask = 16;
  const int64_t row_bytes = ternary_packed_bytes(k);
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t task_work = std::max<int64_t>(1, kRowsPerTask * row_bytes * m);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / task_work);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t row0 = begin * kRowsPerTask, rows = std::min(n, end * kRowsPerTask) - row0;
    simd(m, rows, k, x_blocked.data(), x_sum.data(), packed + row0 * row_bytes, acc + row0, n);
  });
}

}  // namespace bpt::cpu
