// Rotary CPU kernel, forward and backward (the adjoint of the same linear map).
// Built once per instruction set. x is (B, H, T, D), cos/sin are (Bc, T, D), Bc in {1, B}.
//
// forward:  out1 = x1*c1 - x2*s1,  out2 = x2*c2 + x1*s2
// adjoint:  dx1  = g1*c1 + g2*s2,  dx2  = g2*c2 - g1*s1

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "csrc/ops/kernel_utils.h"
#include "csrc/ops/rotary/rotary.h"

namespace bpt::cpu::CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void rotary_typed(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose,
                  const at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  const bool cos_batched = cos.size(0) > 1;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* cos_data = cos.const_data_ptr<scalar_t>();
  const scalar_t* sin_data = sin.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const int64_t rows = B * H * T;

  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> x_buf(D), c_buf(D), s_buf(D), o_buf(D);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * T), t = r % T;
      const int64_t cs_row = (cos_batched ? b * T + t : t) * D;
      const opmath_t* xr = load_opmath(x_data + r * D, x_buf.data(), D);
      const opmath_t* c = load_opmath(cos_data + cs_row, c_buf.data(), D);
      const opmath_t* s = load_opmath(sin_data + cs_row, s_buf.data(), D);
      opmath_t* o = o_buf.data();
      const opmath_t *x1 = xr, *x2 = xr + half;
      if (!transpose) {
        at::vec::map4([](Vec a, Vec ca, Vec b, Vec sa) { return a * ca - b * sa; }, o, x1, c, x2, s, half);
        at::vec::map4([](Vec b, Vec cb, Vec a, Vec sb) { return b * cb + a * sb; }, o + half, x2, c + half, x1,
                      s + half, half);
      } else {
        at::vec::map4([](Vec a, Vec ca, Vec b, Vec sb) { return a * ca + b * sb; }, o, x1, c, x2, s + half, half);
        at::vec::map4([](Vec b, Vec cb, Vec a, Vec sa) { return b * cb - a * sa; }, o + half, x2, c + half, x1, s,
                      half);
      }
      store_opmath(o, out_data + r * D, D);
    }
  });
}

}  // namespace

void rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose,
                  const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bpt::rotary", [&] {
    rotary_typed<scalar_t>(x, cos, sin, transpose, out);
  });
}

}  // namespace bpt::cpu::CPU_CAPABILITY
