// bpt::ternary_pack and bpt::ternary_linear (BitNet b1.58 inference): argument checks, CPU
// and Meta kernels, and Autograd kernels that say there is no gradient. The GEMM itself is in
// ternary_gemm.{h,cpp}; the CUDA kernel in ternary_linear.cu.

#include "csrc/ops/bitlinear/ternary.h"

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/round.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/ops/bitlinear/ternary_gemm.h"
#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {

namespace {
constexpr const char* kPack = "bpt::ternary_pack";
constexpr const char* kLinear = "bpt::ternary_linear";
}  // namespace

void check_ternary_pack_args(const at::Tensor& weight) {
  check_float(kPack, "weight", weight);
  check_dim(kPack, "weight", weight, 2, "[N, K]");
}

void check_ternary_linear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t in_features) {
  check_float(kLinear, "x", x);
  TORCH_CHECK(x.dim() >= 1, kLinear, ": x must be [..., in_features], got a scalar");
  TORCH_CHECK(packed.defined() && packed.scalar_type() == at::kByte, kLinear,
              ": packed must be uint8 (ternary_pack's output), got ",
              packed.defined() ? c10::toString(packed.scalar_type()) : "undefined");
  check_dim(kLinear, "packed", packed, 2, "[N, ceil(in_features / 4)]");
  check_float(kLinear, "scale", scale);
  TORCH_SYM_CHECK(scale.sym_numel().sym_eq(1), kLinear,
                  ": scale must hold one value (ternary_pack's scale), got shape ", scale.sym_sizes());
  TORCH_CHECK(in_features >= 0, kLinear, ": in_features must be >= 0, got ", in_features);
  // Int32 sums of in_features products must not overflow, on every device: the CUDA kernel sums
  // (code + 1) x, up to 254 a term, before it takes the activations' sum off.
  TORCH_CHECK(in_features < (int64_t{1} << 23), kLinear, ": in_features must be < 2^23 = 8388608, got ",
              in_features, " (the int32 sums of int8 x ternary products would overflow)");
  check_size(kLinear, "packed.size(1)", packed.sym_size(1), c10::SymInt((in_features + 3) / 4),
             "ceil(in_features / 4)");
  check_size(kLinear, "x.size(-1)", x.sym_size(-1), c10::SymInt(in_features), "in_features");
  check_same_device(kLinear, "packed", packed, x, "x");
  check_same_device(kLinear, "scale", scale, x, "x");
}

namespace {

std::tuple<at::Tensor, at::Tensor> ternary_pack_cpu(const at::Tensor& weight) {
  check_ternary_pack_args(weight);
  const int64_t N = weight.size(0), K = weight.size(1), row_bytes = cpu::ternary_packed_bytes(K);
  // The training quantizer's arithmetic, op for op: scale = max(mean|W|, 1e-5) in fp32,
  // w_q = clamp(round(W / scale), -1, 1) with torch.round (half to even).
  const at::Tensor w = weight.to(at::kFloat);
  TORCH_CHECK(at::isfinite(w).all().item<bool>(), "bpt::ternary_pack: weight holds non-finite values (NaN or inf)");
  const at::Tensor scale = w.abs().mean().clamp_min(1e-5);
  const at::Tensor w_q = at::round(w / scale).clamp_(-1, 1).to(at::kChar).contiguous();

  at::Tensor packed = at::empty({N, row_bytes}, weight.options().dtype(at::kByte));
  const int8_t* q = w_q.const_data_ptr<int8_t>();
  uint8_t* p = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t b = 0; b < row_bytes; ++b) {
        uint8_t byte = 0;
        for (int64_t e = 0; e < 4; ++e) {
          const int64_t c = 4 * b + e;
          const int code = c < K ? q[j * K + c] + 1 : 1;  // padding encodes 0
          byte |= uint8_t(code << (2 * e));
        }
        p[j * row_bytes + b] = byte;
      }
    }
  });
  return {packed, scale};
}

// On CUDA: packed on the CPU (a one-off conversion before inference, not a hot path), in
// the same format, and moved back.
std::tuple<at::Tensor, at::Tensor> ternary_pack_cuda(const at::Tensor& weight) {
  auto [packed, scale] = ternary_pack_cpu(weight.cpu());
  return {packed.to(weight.device()), scale.to(weight.device())};
}

std::tuple<at::Tensor, at::Tensor> ternary_pack_meta(const at::Tensor& weight) {
  check_ternary_pack_args(weight);
  const c10::SymInt row_bytes = (weight.sym_size(1) + 3) / 4;
  return {at::empty_symint({weight.sym_size(0), row_bytes}, weight.options().dtype(at::kByte)),
          at::empty_symint({}, weight.options().dtype(at::kFloat))};
}

// x [..., K] -> [..., N]: per token x_q = absmax int8 (scale s), acc = x_q . w_q^T in int32,
// y = acc * (scale / s) in fp32, then x's dtype.
at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                              int64_t in_features) {
  check_ternary_linear_args(x, packed, scale, in_features);
  const int64_t K = in_features, N = packed.size(0);
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end() - 1);
  out_sizes.push_back(N);

  const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();
  const at::Tensor packed_c = packed.contiguous();
  const float weight_scale = scale.to(at::kFloat).item<float>();
  std::vector<int8_t> x_q(M * K);
  std::vector<float> x_scale(M);
  cpu::ternary_quantize_activations(M, K, xf.const_data_ptr<float>(), x_q.data(), x_scale.data());
  std::vector<int32_t> acc(M * N);
  cpu::ternary_gemm(M, N, K, x_q.data(), packed_c.const_data_ptr<uint8_t>(), acc.data());

  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* out = y.mutable_data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float dequant = weight_scale / x_scale[i];  // exact int32 -> float while K < 2^17
      for (int64_t j = 0; j < N; ++j) out[i * N + j] = static_cast<float>(acc[i * N + j]) * dequant;
    }
  });
  return y.to(x.scalar_type()).view(out_sizes);
}

at::Tensor ternary_linear_meta(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t in_features) {
  check_ternary_linear_args(x, packed, scale, in_features);
  std::vector<c10::SymInt> out_sizes(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  out_sizes.push_back(packed.sym_size(0));
  return at::empty_symint(out_sizes, x.options());
}

// Inference only. Packing is not differentiable: its outputs never require grad.
std::tuple<at::Tensor, at::Tensor> ternary_pack_autograd(const at::Tensor& weight) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::ternary_pack(weight);
}

// ternary_linear runs with any input requiring grad, but backward through it fails and says
// why: train with bitlinear (straight-through gradients), pack afterwards.
class TernaryLinearFunction : public torch::autograd::Function<TernaryLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& scale, int64_t in_features) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return ops::ternary_linear(x, packed, scale, in_features);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*, torch::autograd::variable_list) {
    TORCH_CHECK(false, kLinear, " has no gradient (inference only): train with bpt::bitlinear, pack afterwards");
    return {};
  }
};

at::Tensor ternary_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                   int64_t in_features) {
  return TernaryLinearFunction::apply(x, packed, scale, in_features);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CPU, m) {
  m.impl("ternary_pack", &ternary_pack_cpu);
  m.impl("ternary_linear", &ternary_linear_cpu);
}

// ternary_linear's CUDA kernel is in ternary_linear.cu (CUDA builds only).
TORCH_LIBRARY_IMPL(bpt, CUDA, m) { m.impl("ternary_pack", &ternary_pack_cuda); }

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("ternary_pack", &ternary_pack_meta);
  m.impl("ternary_linear", &ternary_linear_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) {
  m.impl("ternary_pack", &ternary_pack_autograd);
  m.impl("ternary_linear", &ternary_linear_autograd);
}

}  // namespace bpt::ops
