#pragma once
// RMSNorm module over bpt::rms_norm (LLaMA's pre-norm; Hugging Face's LlamaRMSNorm).

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

namespace bpt::nn {

struct RMSNormOptions {
  /* implicit */ RMSNormOptions(int64_t dim) : dim_(dim) {}
  // Size of the normalised (last) dimension.
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(double, eps) = 1e-6;
};

class RMSNormImpl : public torch::nn::Cloneable<RMSNormImpl> {
 public:
  explicit RMSNormImpl(const RMSNormOptions& options_);

  void reset() override;
  // weight <- 1.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // x [..., dim] -> [..., dim]
  at::Tensor forward(const at::Tensor& x);

  RMSNormOptions options;
  at::Tensor weight;  // [dim]
};

TORCH_MODULE(RMSNorm);

}  // namespace bpt::nn
