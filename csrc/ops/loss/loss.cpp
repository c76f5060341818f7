// bpt::chunked_lm_loss: LM head + cross-entropy over chunks of tokens, forward and backward
// side by side, never materialising [N, vocab] logits. Written over ATen (every device),
// bound as CompositeExplicitAutograd with its own Meta kernel and autograd.
//
//   h [N, D] (any leading dims), w_head [V, D], targets [N] int64 (ignore_index skipped)
//   per chunk: logits = h w_head^T [chunk, V], lse = logsumexp(logits)
//   loss = (sum_valid (lse - logit[target]) + z_loss * sum_valid lse^2) / n_valid
// dlogits = softmax * (1 + 2 z_loss lse) - onehot. Training computes the loss and its gradients
// in the one pass (chunked_lm_loss_with_grad); chunked_lm_loss_backward recomputes the logits.

#include <ATen/ATen.h>  // mm, logsumexp, gather, scatter_add, where, ...
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>

#include "csrc/ops/checks.h"
#include "csrc/ops/weight_grad.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

constexpr const char* kOp = "bpt::chunked_lm_loss";

void check_args(const at::Tensor& h, const at::Tensor& w_head, const at::Tensor& targets, int64_t chunk,
                double z_loss) {
  check_float(kOp, "h", h);
  TORCH_CHECK(h.dim() >= 2 && h.sym_size(-1) != 0, kOp, ": h must be [N, D] or [B, T, D] with D > 0, got shape ",
              h.sym_sizes());
  check_float(kOp, "w_head", w_head);
  check_dim(kOp, "w_head", w_head, 2, "[V, D]");
  check_same_dtype(kOp, "w_head", w_head, h, "h");
  check_same_device(kOp, "w_head", w_head, h, "h");
  check_size(kOp, "w_head.size(1)", w_head.sym_size(1), h.sym_size(-1), "h.size(-1), the model dim D");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, kOp,
              ": targets must be int64 or int32, got ", targets.scalar_type());
  check_same_device(kOp, "targets", targets, h, "h");
  TORCH_CHECK(targets.sym_sizes() == h.sym_sizes().slice(0, h.dim() - 1), kOp,
              ": targets must have h's shape without its last dim, ", h.sym_sizes().slice(0, h.dim() - 1), ", got ",
              targets.sym_sizes());
  check_chunk(kOp, "chunk", chunk);
  TORCH_CHECK(z_loss >= 0, kOp, ": z_loss must be >= 0, got ", z_loss);
}

void check_grad_loss(const at::Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.dim() == 0, kOp, "_backward: grad_loss must be a scalar, got shape ", grad_loss.sym_sizes());
}

// The inputs as rows: h [N, D], targets [N] int64, valid [N] (targets != ignore_index) and
// safe_targets [N] (ignored rows pointed at class 0, so gathers stay in range whatever
// ignore_index is).
struct Rows {
  at::Tensor h, targets, valid, safe_targets;
  int64_t n, step;
};

Rows as_rows(const at::Tensor& h, const at::Tensor& targets, int64_t chunk, int64_t ignore_index) {
  Rows r;
  r.h = h.reshape({-1, h.size(-1)});
  r.targets = targets.reshape({-1}).to(at::kLong);
  r.valid = r.targets != ignore_index;
  r.safe_targets = at::where(r.valid, r.targets, 0);
  r.n = r.h.size(0);
  r.step = resolve_chunk(chunk, r.n);
  return r;
}

// Every counted target must name a class of the head (one host sync, forward only).
void check_targets(const Rows& r, int64_t vocab, int64_t ignore_index) {
  const at::Tensor bad = r.valid & ((r.targets < 0) | (r.targets >= vocab));
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, kOp, ": targets[", i, "] = ", r.targets[i].item<int64_t>(), " is outside the vocabulary [0, ",
                vocab, ") and is not ignore_index (", ignore_index, ")");
  }
}

// One chunk's logits [len, V]: the GEMM runs in h's dtype; float32_logits lifts bf16/fp16
// logits to fp32 before the softmax (llamabpt's flag), otherwise they stay as computed.
at::Tensor chunk_logits(const at::Tensor& hc, const at::Tensor& w_head, bool float32_logits) {
  at::Tensor logits = at::mm(hc, w_head.t());
  return float32_logits && is_reduced_float(logits) ? logits.to(at::kFloat) : logits;
}

// One pass over the chunks of logits. With `loss`, accumulates the cross-entropy (and z-loss)
// sums and the correct count; with `grad_coef` (d loss_total / d loss_sum: grad_loss / n_valid),
// turns each chunk's logits into dlogits in place and accumulates grad_h and grad_w_head, so
// the loss and its gradients can share one GEMM for the logits.
struct PassResult {
  at::Tensor ce_sum, z_sum, n_correct;  // with loss
  at::Tensor dh, dw;                    // with grad_coef
};

PassResult chunked_pass(const Rows& rows, const at::Tensor& w_head, double z_loss, bool float32_logits, bool loss,
                        const std::optional<at::Tensor>& grad_coef) {
  const auto acc = accumulate_type(rows.h);
  PassResult r;
  if (loss) {
    r.ce_sum = at::zeros({}, rows.h.options().dtype(acc));
    r.z_sum = at::zeros({}, rows.h.options().dtype(acc));
    r.n_correct = at::zeros({}, rows.h.options().dtype(at::kLong));
  }
  if (grad_coef) {
    r.dw = at::zeros(w_head.sizes(), w_head.options().dtype(acc));
    r.dh = at::empty(rows.h.sizes(), rows.h.options());
  }
  for (int64_t start = 0; start < rows.n; start += rows.step) {
    const int64_t len = std::min(rows.step, rows.n - start);
    const at::Tensor hc = rows.h.narrow(0, start, len);
    at::Tensor logits = chunk_logits(hc, w_head, float32_logits);
    const at::Tensor t = rows.safe_targets.narrow(0, start, len), valid = rows.valid.narrow(0, start, len);
    // Few passes over the [len, V] block, in place: max (and argmax), exp(logits - max), sum.
    const auto [row_max, argmax] = logits.max(1, /*keepdim=*/true);  // [len, 1]
    const at::Tensor target_logit = logits.gather(1, t.unsqueeze(1));
    const at::Tensor exps = logits.sub_(row_max).exp_();
    const at::Tensor sum = exps.sum(1, /*keepdim=*/true);
    const at::Tensor lse = (sum.to(acc).log() + row_max.to(acc)).squeeze(1);  // [len]
    if (loss) {
      r.ce_sum.add_(at::where(valid, lse - target_logit.squeeze(1).to(acc), 0).sum());
      if (z_loss > 0) r.z_sum.add_(at::where(valid, lse * lse, 0).sum());
      r.n_correct.add_((argmax.squeeze(1) == t).logical_and_(valid).sum());
    }
    if (!grad_coef) continue;
    // d loss / d logit = coef * (softmax * (1 + 2 z_loss lse) - onehot(target)) on valid rows,
    // built in place from exps: one [chunk, V] buffer.
    const at::Tensor row_coef = valid.to(acc) * *grad_coef;  // [len]
    at::Tensor row_scale = row_coef / sum.squeeze(1).to(acc);
    if (z_loss > 0) row_scale = row_scale * (lse * (2 * z_loss) + 1);
    at::Tensor dlogits = exps.mul_(row_scale.unsqueeze(1).to(exps.scalar_type()));
    dlogits.scatter_add_(1, t.unsqueeze(1), (-row_coef).unsqueeze(1).to(dlogits.scalar_type()));
    const at::Tensor dl = dlogits.to(rows.h.scalar_type());
    at::Tensor dh_chunk = r.dh.narrow(0, start, len);
    at::mm_out(dh_chunk, dl, w_head);
    add_transposed_product(r.dw, dl, hc);
  }
  return r;
}

// 1 / n_valid in the accumulation type; no valid target gives loss 0 (not NaN), so an
// all-padding batch does not poison training.
at::Tensor inverse_count(const Rows& rows, at::ScalarType acc) {
  return 1.0 / rows.valid.sum().clamp_min(1).to(acc);
}

// The loss over all chunks and, with `with_grad`, its gradients for grad_loss = 1 from the same
// pass over the logits.
struct LossResult {
  at::Tensor loss, n_tokens;
  PassResult pass;
};

LossResult loss_pass(const at::Tensor& h, const at::Tensor& w_head, const at::Tensor& targets, int64_t chunk,
                     int64_t ignore_index, double z_loss, bool float32_logits, bool with_grad) {
  check_args(h, w_head, targets, chunk, z_loss);
  const Rows rows = as_rows(h, targets, chunk, ignore_index);
  check_targets(rows, w_head.size(0), ignore_index);
  const at::Tensor coef = inverse_count(rows, accumulate_type(h));
  LossResult r;
  r.pass = chunked_pass(rows, w_head, z_loss, float32_logits, /*loss=*/true,
                        with_grad ? std::optional<at::Tensor>(coef) : std::nullopt);
  r.loss = (r.pass.ce_sum + r.pass.z_sum * z_loss) * coef;
  r.n_tokens = rows.valid.sum();
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_impl(const at::Tensor& h, const at::Tensor& w_head,
                                                         const at::Tensor& targets, int64_t chunk,
                                                         int64_t ignore_index, double z_loss, bool float32_logits) {
  const LossResult r = loss_pass(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits, false);
  return {r.loss, r.n_tokens, r.pass.n_correct};
}

std::tuple<at::Tensor, at::Tensor> loss_backward_impl(const at::Tensor& grad_loss, const at::Tensor& h,
                                                      const at::Tensor& w_head, const at::Tensor& targets,
                                                      int64_t chunk, int64_t ignore_index, double z_loss,
                                                      bool float32_logits) {
  check_args(h, w_head, targets, chunk, z_loss);
  check_grad_loss(grad_loss);
  const Rows rows = as_rows(h, targets, chunk, ignore_index);
  const auto acc = accumulate_type(h);
  const PassResult r = chunked_pass(rows, w_head, z_loss, float32_logits, /*loss=*/false,
                                    grad_loss.to(acc) * inverse_count(rows, acc));
  return {r.dh.view(h.sizes()), r.dw.to(w_head.scalar_type())};
}

// The loss and its gradients for grad_loss = 1 in one pass: three GEMMs per chunk instead of
// the four of forward + backward (which recomputes the logits). Autograd uses it in training.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_with_grad_impl(
    const at::Tensor& h, const at::Tensor& w_head, const at::Tensor& targets, int64_t chunk, int64_t ignore_index,
    double z_loss, bool float32_logits) {
  const LossResult r = loss_pass(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits, true);
  return {r.loss, r.n_tokens, r.pass.n_correct, r.pass.dh.view(h.sizes()), r.pass.dw.to(w_head.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_meta(const at::Tensor& h, const at::Tensor& w_head,
                                                         const at::Tensor& targets, int64_t chunk,
                                                         int64_t ignore_index, double z_loss, bool float32_logits) {
  check_args(h, w_head, targets, chunk, z_loss);
  const auto scalar = [&](at::ScalarType t) { return at::empty({}, h.options().dtype(t)); };
  return {scalar(accumulate_type(h)), scalar(at::kLong), scalar(at::kLong)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> loss_with_grad_meta(
    const at::Tensor& h, const at::Tensor& w_head, const at::Tensor& targets, int64_t chunk, int64_t ignore_index,
    double z_loss, bool float32_logits) {
  auto [loss, n_tokens, n_correct] = loss_meta(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits);
  return {loss, n_tokens, n_correct, at::empty_symint(h.sym_sizes(), h.options()),
          at::empty_symint(w_head.sym_sizes(), w_head.options())};
}

std::tuple<at::Tensor, at::Tensor> loss_backward_meta(const at::Tensor& grad_loss, const at::Tensor& h,
                                                      const at::Tensor& w_head, const at::Tensor& targets,
                                                      int64_t chunk, int64_t ignore_index, double z_loss,
                                                      bool float32_logits) {
  check_args(h, w_head, targets, chunk, z_loss);
  check_grad_loss(grad_loss);
  return {at::empty_symint(h.sym_sizes(), h.options()), at::empty_symint(w_head.sym_sizes(), w_head.options())};
}

// No logits survive the forward. When h or w_head needs a gradient, the forward computes the
// loss and its gradients together (chunked_lm_loss_with_grad) and the backward scales them by
// grad_loss; otherwise it computes the loss alone and saves nothing.
class ChunkedLMLossFunction : public torch::autograd::Function<ChunkedLMLossFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& h,
                                                const at::Tensor& w_head, const at::Tensor& targets, int64_t chunk,
                                                int64_t ignore_index, double z_loss, bool float32_logits,
                                                bool with_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor loss, n_tokens, n_correct;
    if (with_grad) {
      at::Tensor grad_h, grad_w_head;
      std::tie(loss, n_tokens, n_correct, grad_h, grad_w_head) =
          ops::chunked_lm_loss_with_grad(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits);
      ctx->save_for_backward({grad_h, grad_w_head});
    } else {
      std::tie(loss, n_tokens, n_correct) =
          ops::chunked_lm_loss(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits);
    }
    ctx->mark_non_differentiable({n_tokens, n_correct});
    return {loss, n_tokens, n_correct};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    std::vector<at::Tensor> result(8);
    if (!grads[0].defined()) return result;
    const auto saved = ctx->get_saved_variables();
    result[0] = saved[0] * grads[0].to(saved[0].scalar_type());
    result[1] = saved[1] * grads[0].to(saved[1].scalar_type());
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_autograd(const at::Tensor& h, const at::Tensor& w_head,
                                                             const at::Tensor& targets, int64_t chunk,
                                                             int64_t ignore_index, double z_loss,
                                                             bool float32_logits) {
  // Grad mode is off inside forward(): decide here whether a backward can follow.
  const bool with_grad = at::GradMode::is_enabled() && (h.requires_grad() || w_head.requires_grad());
  auto outs =
      ChunkedLMLossFunction::apply(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits, with_grad);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(bpt, CompositeExplicitAutograd, m) {
  m.impl("chunked_lm_loss", &loss_impl);
  m.impl("chunked_lm_loss_backward", &loss_backward_impl);
  m.impl("chunked_lm_loss_with_grad", &loss_with_grad_impl);
}

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("chunked_lm_loss", &loss_meta);
  m.impl("chunked_lm_loss_backward", &loss_backward_meta);
  m.impl("chunked_lm_loss_with_grad", &loss_with_grad_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) { m.impl("chunked_lm_loss", &loss_autograd); }

}  // namespace bpt::ops
