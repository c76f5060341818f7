// RMSNorm CPU kernels, forward and backward side by side. Built once per instruction set.
// x is (rows, D), weight is (D), everything contiguous; statistics in opmath (fp32 for
// bf16/fp16 input, fp64 for fp64).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "csrc/ops/kernel_utils.h"
#include "csrc/ops/rms_norm/rms_norm.h"

namespace bpt::cpu::CPU_CAPABILITY {
namespace {

// Rows per parallel task: about 32k elements of work each.
int64_t row_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1)); }

template <typename opmath_t>
opmath_t inverse_rms(const opmath_t* x, int64_t D, double eps) {
  using Vec = at::vec::Vectorized<opmath_t>;
  const opmath_t sum_sq = at::vec::map_reduce_all<opmath_t>(
      [](Vec v) { return v * v; }, [](Vec a, Vec b) { return a + b; }, x, D);
  return opmath_t(1) / std::sqrt(sum_sq / opmath_t(D) + opmath_t(eps));
}

// out = weight * cast(x * rstd): the cast rounds to scalar_t first, as Hugging Face does.
template <typename scalar_t>
void forward_typed(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t D = x.size(-1);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  std::vector<opmath_t> w_buf(D);
  const opmath_t* w = load_opmath(weight.const_data_ptr<scalar_t>(), w_buf.data(), D);

  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> x_buf(D), y_buf(D);
    for (int64_t r = begin; r < end; ++r) {
      const opmath_t* xr = load_opmath(x_data + r * D, x_buf.data(), D);
      const Vec rstd(inverse_rms(xr, D, eps));
      scalar_t* yr = out_data + r * D;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        at::vec::map2([rstd](Vec xv, Vec wv) { return xv * rstd * wv; }, yr, xr, w, D);
      } else {
        at::vec::map([rstd](Vec xv) { return xv * rstd; }, y_buf.data(), xr, D);
        at::vec::convert(y_buf.data(), yr, D);  // round the normalised value to scalar_t
        at::vec::convert(yr, y_buf.data(), D);
        at::vec::map2([](Vec nv, Vec wv) { return nv * wv; }, y_buf.data(), y_buf.data(), w, D);
        at::vec::convert(y_buf.data(), yr, D);
      }
    }
  });
}

// With n = x * rstd and dot = sum_i g_i w_i x_i:
//   grad_x = rstd * g * w - x * rstd^3 * dot / D,   grad_weight = sum over rows of g * n.
template <typename scalar_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                    double eps, const at::Tensor& grad_x, const at::Tensor& grad_weight) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t D = x.size(-1);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* g_data = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gx_data = grad_x.mutable_data_ptr<scalar_t>();
  std::vector<opmath_t> w_buf(D);
  const opmath_t* w = load_opmath(weight.const_data_ptr<scalar_t>(), w_buf.data(), D);

  // One grad_weight partial per thread, summed at the end (no atomics, deterministic
  // for a fixed thread count).
  const int64_t n_threads = at::get_num_threads();
  std::vector<opmath_t> dw_partial(n_threads * D, opmath_t(0));

  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    opmath_t* dw = dw_partial.data() + at::get_thread_num() * D;
    std::vector<opmath_t> x_buf(D), g_buf(D), gx_buf(D);
    for (int64_t r = begin; r < end; ++r) {
      const opmath_t* xr = load_opmath(x_data + r * D, x_buf.data(), D);
      const opmath_t* gr = load_opmath(g_data + r * D, g_buf.data(), D);
      const opmath_t rstd = inverse_rms(xr, D, eps);
      const opmath_t dot = at::vec::map3_reduce_all<opmath_t>(
          [](Vec gv, Vec wv, Vec xv) { return gv * wv * xv; }, [](Vec a, Vec b) { return a + b; },
          gr, w, xr, D);
      const Vec rstd_v(rstd);
      const Vec coef(rstd * rstd * rstd * dot / opmath_t(D));
      opmath_t* gxr = std::is_same_v<scalar_t, opmath_t> ? reinterpret_cast<opmath_t*>(gx_data + r * D)
                                                        : gx_buf.data();
      at::vec::map3([rstd_v, coef](Vec gv, Vec wv, Vec xv) { return rstd_v * gv * wv - xv * coef; },
                    gxr, gr, w, xr, D);
      store_opmath(gxr, gx_data + r * D, D);
      at::vec::map3([rstd_v](Vec acc, Vec gv, Vec xv) { return acc + gv * xv * rstd_v; },
                    dw, dw, gr, xr, D);
    }
  });

  opmath_t* gw = grad_weight.mutable_data_ptr<opmath_t>();
  std::fill(gw, gw + D, opmath_t(0));
  for (int64_t t = 0; t < n_threads; ++t) {
    const opmath_t* part = dw_partial.data() + t * D;
    for (int64_t i = 0; i < D; ++i) gw[i] += part[i];
  }
}

}  // namespace

void rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bpt::rms_norm", [&] {
    forward_typed<scalar_t>(x, weight, eps, out);
  });
}

void rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                       double eps, const at::Tensor& grad_x, const at::Tensor& grad_weight) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bpt::rms_norm_backward", [&] {
    backward_typed<scalar_t>(grad_out, x, weight, eps, grad_x, grad_weight);
  });
}

}  // namespace bpt::cpu::CPU_CAPABILITY
