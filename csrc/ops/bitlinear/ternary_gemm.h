#pragma once
// BitNet b1.58 inference GEMM: int8 activations x ternary weights, summed exactly in int32.
//
// Format "TQ2" (ternary_pack writes it, every kernel here reads it): a weight [N, K] with
// values w_q in {-1, 0, +1} is uint8 [N, ternary_packed_bytes(K)], row-major; element k of a
// row sits in byte k / 4 at bits 2 (k % 4) and 2 (k % 4) + 1 as the code w_q + 1
// (0b00 = -1, 0b01 = 0, 0b10 = +1; 0b11 never occurs). Padding past K in a row's last byte
// holds the code of 0. The fp32 scale (max(mean |W|, 1e-5)) travels beside it; not used here.
//
//   acc[i, j] = sum_k x_q[i, k] * w_q[j, k]       x_q [m, k] int8, acc [m, n] int32
//
// The sums are exact (|acc| <= 128 k), so every kernel gives the same bits.
//
// The SIMD kernels multiply unsigned codes by signed activations (vpdpbusd, vpmaddubsw) and
// subtract the activations' sum: sum_k (w_q + 1) x_q - sum_k x_q = acc. They read the
// activations in "block order", in which field s (bits 2s, 2s + 1) of the 64 code bytes of
// run b lines up with 64 contiguous activations:
//   x_blocked[i * ternary_blocked_stride(k) + 256 b + 64 s + j] = x_q[i, 256 b + 4 j + s]
// (zero past k), x_sum[i] = sum_k x_q[i, k]; ternary_block_activations writes both.
//
// This header includes no ATen: the SIMD files that include it are built with their own
// instruction-set flags and must not instantiate shared inline code.

#include <cstdint>

namespace bpt::cpu {

// Bytes per packed row of k values.
static constexpr int64_t ternary_packed_bytes(int64_t k) { return (k + 3) / 4; }
// Bytes per token of block-order activations: k rounded up to whole 256-value blocks.
static constexpr int64_t ternary_blocked_stride(int64_t k) { return (k + 255) / 256 * 256; }

enum class TernaryKernel { Reference, Avx2, Avx512Vnni };

// Whether this CPU runs `kernel` and ATen's capability (ATEN_CPU_CAPABILITY) allows its
// instruction set: Avx2 needs AVX2 and capability AVX2 or AVX512, Avx512Vnni needs
// AVX512-VNNI and capability AVX512. Reference is always available.
bool ternary_kernel_available(TernaryKernel kernel);
// The fastest available kernel.
TernaryKernel ternary_best_kernel();

// acc [m, n] (contiguous) = x_q [m, k] . w_q^T with `kernel`, parallel over rows of the
// weight (at::parallel_for); the kernel must be available.
void ternary_gemm(int64_t m, int64_t n, int64_t k, const int8_t* x_q, const uint8_t* packed, int32_t* acc,
                  TernaryKernel kernel = ternary_best_kernel());

// The obvious loop, one code at a time, single-threaded: what the tests compare against.
void ternary_gemm_reference(int64_t m, int64_t n, int64_t k, const int8_t* x_q, const uint8_t* packed,
                            int32_t* acc);

// Per-token absmax quantization, as BitNet b1.58's activation_quant in fp32: x [m, k] ->
//   s[i] = 127 / max(max_k |x[i, k]|, 1e-5),  x_q[i, k] = clamp(round(x[i, k] * s[i]), -128, 127)
// (float product, round half to even, as torch.round). A row holding NaN or inf gets
// s = NaN and x_q = 0, so its outputs come out NaN.
void ternary_quantize_activations(int64_t m, int64_t k, const float* x, int8_t* x_q, float* s);

// x_q [m, k] -> x_blocked [m, ternary_blocked_stride(k)] and x_sum [m] (see above).
void ternary_block_activations(int64_t m, int64_t k, const int8_t* x_q, int8_t* x_blocked, int32_t* x_sum);

// SIMD kernels on block-order activations, single-threaded, for rows 0 .. n-1 of `packed`
// (row stride ternary_packed_bytes(k)) into acc[i * ld_acc + j]. Call only when available.
void ternary_gemm_avx2(int64_t m, int64_t n, int64_t k, const int8_t* x_blocked, const int32_t* x_sum,
                       const uint8_t* packed, int32_t* acc, int64_t ld_acc);
void ternary_gemm_avx512vnni(int64_t m, int64_t n, int64_t k, const int8_t* x_blocked, const int32_t* x_sum,
                             const uint8_t* packed, int32_t* acc, int64_t ld_acc);

}  // namespace bpt::cpu
