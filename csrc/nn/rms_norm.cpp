#include "csrc/nn/rms_norm.h"

#include <torch/nn/init.h>

#include "csrc/ops/ops.h"

namespace bpt::nn {

RMSNormImpl::RMSNormImpl(const RMSNormOptions& options_) : options(options_) { reset(); }

void RMSNormImpl::reset() {
  TORCH_CHECK(options.dim() > 0, "RMSNorm: dim must be positive, got ", options.dim());
  weight = register_parameter("weight", at::empty({options.dim()}));
  reset_parameters();
}

void RMSNormImpl::reset_parameters() {
  at::NoGradGuard no_grad;
  weight.fill_(1.0);
}

void RMSNormImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::RMSNorm(" << options.dim() << ", eps=" << options.eps() << ")";
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) { return ops::rms_norm(x, weight, options.eps()); }

}  // namespace bpt::nn
