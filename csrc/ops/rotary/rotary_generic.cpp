// bpt::rotary in ATen calls, for any device: out = x cos + rotate_half(x) sin in opmath,
// rounded once; the backward applies the adjoint, g cos + rotate_half^T(g sin).

#include <ATen/ATen.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/rotary/rotary.h"

namespace bpt::generic {

at::Tensor rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool transpose) {
  const auto opmath = ops::accumulate_type(x);
  // [T, D] or [Bc, T, D] -> [Bc, 1, T, D]: broadcast over the heads.
  const auto table = [opmath](const at::Tensor& t) {
    return (t.dim() == 2 ? t.unsqueeze(0) : t).unsqueeze(1).to(opmath);
  };
  const at::Tensor xf = x.to(opmath), c = table(cos), s = table(sin);
  const int64_t h = x.size(-1) / 2;
  if (!transpose) {  // x c + rotate_half(x) s, with rotate_half(x) = [-x2, x1]
    return (xf * c + at::cat({-xf.narrow(-1, h, h), xf.narrow(-1, 0, h)}, -1) * s).to(x.scalar_type());
  }
  // g c + rotate_half^T(g s), with rotate_half^T(u) = [u2, -u1]
  const at::Tensor u = xf * s;
  return (xf * c + at::cat({u.narrow(-1, h, h), -u.narrow(-1, 0, h)}, -1)).to(x.scalar_type());
}

}  // namespace bpt::generic
