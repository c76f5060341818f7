// bpt::blockwise_ffn: SwiGLU feed-forward over chunks of tokens, forward and backward side
// by side. Plain GEMM and elementwise work per chunk, written over ATen so the same code runs
// on every device (bound as CompositeExplicitAutograd), with its own Meta kernel and autograd.
//
//   x [N, D] (any leading dims), w_gate, w_up [F, D], w_down [D, F] (nn.Linear layout)
//   g = x w_gate^T, u = x w_up^T          [chunk, F]   (F: the hidden size)
//   y = (silu(g) * u) w_down^T            [chunk, D]
// Only one chunk's [chunk, F] intermediates exist at a time, in forward and in backward
// (which recomputes them); weight gradients accumulate across chunks (in fp32 for bf16/fp16).

#include <ATen/ops/mm.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/ops/checks.h"
#include "csrc/ops/weight_grad.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

constexpr const char* kOp = "bpt::blockwise_ffn";

void check_args(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                int64_t chunk) {
  check_float(kOp, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) != 0, kOp, ": x must be [..., D] with D > 0, got shape ", x.sym_sizes());
  for (const auto& [name, w] : {std::pair<const char*, const at::Tensor&>{"w_gate", w_gate}, {"w_up", w_up},
                                {"w_down", w_down}}) {
    check_float(kOp, name, w);
    check_dim(kOp, name, w, 2, std::string(name) == "w_down" ? "[D, F]" : "[F, D]");
    check_same_dtype(kOp, name, w, x, "x");
    check_same_device(kOp, name, w, x, "x");
  }
  check_size(kOp, "w_gate.size(1)", w_gate.sym_size(1), x.sym_size(-1), "x.size(-1), the model dim D");
  TORCH_SYM_CHECK(w_up.sym_size(0).sym_eq(w_gate.sym_size(0)) & w_up.sym_size(1).sym_eq(w_gate.sym_size(1)), kOp,
                  ": w_up must have w_gate's shape ", w_gate.sym_sizes(), ", got ", w_up.sym_sizes());
  TORCH_SYM_CHECK(w_down.sym_size(0).sym_eq(w_gate.sym_size(1)) & w_down.sym_size(1).sym_eq(w_gate.sym_size(0)),
                  kOp, ": w_down must be [D, F] = [", w_gate.sym_size(1), ", ", w_gate.sym_size(0), "], got ",
                  w_down.sym_sizes());
  check_chunk(kOp, "chunk", chunk);
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x) {
  check_like("bpt::blockwise_ffn_backward", "grad_out", grad_out, x, "x");
}

at::Tensor ffn_impl(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                    int64_t chunk) {
  check_args(x, w_gate, w_up, w_down, chunk);
  const int64_t D = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, D});
  const int64_t N = x2.size(0), step = resolve_chunk(chunk, N);
  at::Tensor y = at::empty({N, D}, x.options());
  const at::Tensor wg_t = w_gate.t(), wu_t = w_up.t(), wd_t = w_down.t();
  for (int64_t start = 0; start < N; start += step) {
    const at::Tensor xc = x2.narrow(0, start, std::min(step, N - start));
    at::Tensor y_chunk = y.narrow(0, start, xc.size(0));
    at::mm_out(y_chunk, at::silu(at::mm(xc, wg_t)).mul_(at::mm(xc, wu_t)), wd_t);
  }
  return y.view(x.sizes());
}

// With s = silu(g), a = s * u and dy the output gradient of a chunk:
//   da = dy w_down, du = da * s, dg = da * u * silu'(g), silu'(g) = sig(g) (1 + g (1 - sig(g)))
//   dx = dg w_gate + du w_up; dw_down += dy^T a, dw_gate += dg^T x, dw_up += du^T x
// GEMMs run in x's dtype; the elementwise part and the weight-gradient sums in fp32 (fp64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down, int64_t chunk) {
  check_args(x, w_gate, w_up, w_down, chunk);
  check_grad_out(grad_out, x);
  const int64_t D = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, D}), gy2 = grad_out.reshape({-1, D});
  const int64_t N = x2.size(0), step = resolve_chunk(chunk, N);
  const auto dtype = x.scalar_type(), acc = accumulate_type(x);
  const auto acc_opts = w_gate.options().dtype(acc);
  at::Tensor dw_gate = at::zeros(w_gate.sizes(), acc_opts), dw_up = at::zeros(w_up.sizes(), acc_opts);
  at::Tensor dw_down = at::zeros(w_down.sizes(), acc_opts);
  at::Tensor dx = at::empty({N, D}, x.options());
  for (int64_t start = 0; start < N; start += step) {
    const int64_t len = std::min(step, N - start);
    const at::Tensor xc = x2.narrow(0, start, len), dy = gy2.narrow(0, start, len);
    const at::Tensor gate = at::mm(xc, w_gate.t()).to(acc), up = at::mm(xc, w_up.t()).to(acc);
    const at::Tensor sig = at::sigmoid(gate);
    const at::Tensor silu = gate * sig;
    add_transposed_product(dw_down, dy, (silu * up).to(dtype));
    const at::Tensor da = at::mm(dy, w_down).to(acc);
    const at::Tensor d_up = (da * silu).to(dtype);
    const at::Tensor d_gate = da.mul_(up).mul_(sig * (1 + gate * (1 - sig))).to(dtype);
    at::Tensor dx_chunk = dx.narrow(0, start, len);
    at::mm_out(dx_chunk, d_gate, w_gate);
    dx_chunk.addmm_(d_up, w_up);
    add_transposed_product(dw_gate, d_gate, xc);
    add_transposed_product(dw_up, d_up, xc);
  }
  const auto wt = w_gate.scalar_type();
  return {dx.view(x.sizes()), dw_gate.to(wt), dw_up.to(wt), dw_down.to(wt)};
}

at::Tensor ffn_meta(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
                    int64_t chunk) {
  check_args(x, w_gate, w_up, w_down, chunk);
  return at::empty_symint(x.sym_sizes(), x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_backward_meta(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down, int64_t chunk) {
  check_args(x, w_gate, w_up, w_down, chunk);
  check_grad_out(grad_out, x);
  return {at::empty_symint(x.sym_sizes(), x.options()), at::empty_symint(w_gate.sym_sizes(), w_gate.options()),
          at::empty_symint(w_up.sym_sizes(), w_up.options()), at::empty_symint(w_down.sym_sizes(), w_down.options())};
}

// Saves only the inputs; the backward recomputes each chunk's intermediates.
class BlockwiseFFNFunction : public torch::autograd::Function<BlockwiseFFNFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_gate,
                            const at::Tensor& w_up, const at::Tensor& w_down, int64_t chunk) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, w_gate, w_up, w_down});
    ctx->saved_data["chunk"] = chunk;
    return ops::blockwise_ffn(x, w_gate, w_up, w_down, chunk);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (!grads[0].defined()) return std::vector<at::Tensor>(5);
    const auto s = ctx->get_saved_variables();
    auto [dx, dw_gate, dw_up, dw_down] =
        ops::blockwise_ffn_backward(grads[0], s[0], s[1], s[2], s[3], ctx->saved_data["chunk"].toInt());
    return {dx, dw_gate, dw_up, dw_down, at::Tensor()};
  }
};

at::Tensor ffn_autograd(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                        const at::Tensor& w_down, int64_t chunk) {
  return BlockwiseFFNFunction::apply(x, w_gate, w_up, w_down, chunk);
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CompositeExplicitAutograd, m) {
  m.impl("blockwise_ffn", &ffn_impl);
  m.impl("blockwise_ffn_backward", &ffn_backward_impl);
}

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("blockwise_ffn", &ffn_meta);
  m.impl("blockwise_ffn_backward", &ffn_backward_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) { m.impl("blockwise_ffn", &ffn_autograd); }

}  // namespace bpt::ops
