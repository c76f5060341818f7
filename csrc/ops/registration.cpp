// Every bpt op schema, in one place. Kernels are bound per dispatch key (CPU, Meta,
// Autograd, later CUDA) next to each op, in csrc/ops/<op>/.

#include <torch/library.h>

TORCH_LIBRARY(bpt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps=1e-06) -> Tensor");
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rotary_backward(Tensor grad_out, Tensor cos, Tensor sin) -> Tensor");
}
