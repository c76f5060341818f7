// bpt::ternary_linear on CUDA: the CPU op's numerics (ternary.cpp, ternary_gemm.h) in two steps.
//
//   quantize_tokens: x [M, K] -> x_q (int8, the layout below), x_sum[m] = sum_k x_q[m, k] and
//                    dequant[m] = scale / s_m, s_m = 127 / max(max|x_m|, 1e-5); x_q rounds with
//                    rintf (half to even). A token holding NaN or inf gets x_q = 0, x_sum = 0
//                    and dequant = NaN. One block per token.
//   ternary_gemm:    y[m, n] = float(sum_k x_q[m, k] w_q[n, k]) * dequant[m], in x's dtype.
//
// The float operations are spelled with __fmul_rn / __fdiv_rn so that FMA contraction and fast
// math's approximate division change no rounding: the outputs equal the CPU op's bit for bit
// (NaN payloads aside; -ftz would still flush a subnormal, which only a tiny scale makes). The
// int32 sums are exact (in_features < 2^23 keeps even the biased sums below 2^31), so their
// order does not matter.
//
// ternary_gemm, one kernel template in two shapes: a warp owns 4 output rows and kTokens
// tokens (32 int32 sums at most) over the whole of K, with no shared memory and no block sync.
//   M == 1 (decoding): the GEMV, kTokens = 1, its loop unrolled twice for more loads in flight.
//   Memory bound on the 2-bit codes (N K / 4 bytes, an eighth of a bf16 weight's).
//   M >= 2: the small-batch GEMM, tiles of kTokens = 8 tokens (the remainder, M % 8, in one
//   more launch with the smallest of 1, 2, 4, 8 that holds it). Each decoded code word feeds
//   kTokens x 4 __dp4a, each loaded activation word 4 rows. Why 8: a code byte costs kTokens
//   __dp4a; at 64 __dp4a per SM and clock (half the int32 rate, an assumption) an H100 runs
//   out of __dp4a before memory bandwidth from about 5 tokens on, so an 8-token tile is
//   compute bound and a wider one would buy only registers (147 on sm_90a, 166 on sm_80
//   already: 3 blocks of 4 warps per SM).
//   Larger M runs the same kernel over tiles of 8, blockIdx.y walking them (a grid row of 65535
//   tiles at most; blocks loop past that). Its time grows with M while a bf16 cuBLAS matmul of
//   the dense weight stays memory bound, so past about 32 tokens (prefill) that should be
//   faster (an estimate, not measured): an int8 tensor-core (mma.s8) GEMM would be the path
//   there, and is not written.
// Lane l reads 16 bytes of each row's codes (64 weights, one "chunk") at chunks l, l + 32, ...,
// so a warp's load covers 512 contiguous bytes. The words are not decoded to -1/0/+1: a code
// word masked as (w >> 2s) & 0x03030303 gives four codes w_q + 1 in 0..2, which __dp4a
// multiplies as signed bytes, and sum (w_q + 1) x_q - x_sum = sum w_q x_q, as the CPU's SIMD
// kernels do. The 4 x kTokens sums of a warp are reduce-scattered across its lanes (31
// shuffles for 32 sums), and lane 32 v / (4 kTokens) stores sum v.
//
// x_q layout, per token, made so that field s of each code byte lines up with one int32 of
// activations and every load is a coalesced 16-byte load: chunk c (code bytes 16c..16c+15,
// activations 64c..64c+63) owns four int4 of activations, one per code word j = 0..3 of the
// chunk, at int4 index 128 (c / 32) + width j + c % 32 (width 32, or chunks % 32 in the last,
// partial group of 32 chunks). Within that int4, int32 s holds, byte i, the activation of field
// s of code byte i of the word: x_q[64c + 16j + 4i + s]. A token takes 64 ceil(K4 / 64) bytes
// (K4 = 4 ceil(K / 4)), zero past K.
//
// Code loads: 16-byte vectors where every row starts 16-byte aligned (row bytes a multiple of
// 16, an aligned pointer; true for K a multiple of 64); otherwise bytes one at a time (the
// same chunks, bytes past the row read as 0, against zero activations), with no separate
// tail. Activations are read from global memory through L1 (a token tile is kTokens K bytes,
// shared by every warp of the SM that works on it, 88 KB for 8 tokens of K = 11008), not
// staged in shared memory.
//
// Not tuned, or not measured: nothing here has run on a GPU yet (tests/python/test_cuda.py
// compares it with the CPU op bit for bit; tools/bench/bitlinear.py --device cuda times it).
// The kernels (ternary_kernels.cuh) do run on the CPU under tests/cpp/cuda_emulation.h, bit
// for bit against the CPU op (tests/cpp/test_ternary_kernels.cpp).
// The quantize step is a launch of its own and reads x twice; the byte path loads a byte at a
// time; there is no split over K, so few rows with a long K keep few warps busy; an 8-token
// tile of K = 28672 (224 KB) no longer fits L1 and streams from L2.

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "csrc/ops/bitlinear/ternary.h"
#include "csrc/ops/bitlinear/ternary_kernels.cuh"

namespace bpt::ops {
namespace {

using namespace ternary_cuda;

at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t in_features) {
  check_ternary_linear_args(x, packed, scale, in_features);
  TORCH_CHECK(x.is_cuda(), "bpt::ternary_linear: the CUDA kernel got x on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features, N = packed.size(0), row_bytes = packed.size(1);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  // (in_features < 2^23, checked above, keeps 16 x chunks, the quantize loop's int, far from
  // overflow.)
  constexpr int64_t kMaxRows = int64_t{INT_MAX} * kGemmWarps * kRowsPerWarp;
  TORCH_CHECK(M <= INT_MAX && N <= kMaxRows, "bpt::ternary_linear: on CUDA, x must hold at most ", INT_MAX,
              " tokens and packed at most ", kMaxRows, " rows; got ", M, " tokens and ", N, " rows");
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);

  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.view(out_sizes);
  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor packed_c = packed.contiguous();
  const at::Tensor scale_f = scale.to(at::kFloat).reshape({});
  at::Tensor x_q = at::empty({M, 16 * int64_t{code_chunks(row_bytes)}}, x.options().dtype(at::kInt));
  at::Tensor x_sum = at::empty({M}, x.options().dtype(at::kInt));
  at::Tensor dequant = at::empty({M}, x.options().dtype(at::kFloat));

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [stream](dim3 grid, dim3 block, auto kernel, auto... args) {
    kernel<<<grid, block, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bpt::ternary_linear", [&] {
    run_ternary_linear<scalar_t>(
        launch, {xc.const_data_ptr<scalar_t>(), packed_c.const_data_ptr<uint8_t>(), scale_f.const_data_ptr<float>(),
                 y.mutable_data_ptr<scalar_t>(), x_q.mutable_data_ptr<int>(), x_sum.mutable_data_ptr<int>(),
                 dequant.mutable_data_ptr<float>(), M, N, K, row_bytes});
  });
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CUDA, m) { m.impl("ternary_linear", &ternary_linear_cuda); }

}  // namespace bpt::ops
