#include <ATen/core/dispatch/Dispatcher.h>

#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("bpt::rms_norm");
  return op.call(x, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("bpt::rms_norm_backward");
  return op.call(grad_out, x, weight, eps);
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("bpt::rotary");
  return op.call(x, cos, sin);
}

at::Tensor rotary_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("bpt::rotary_backward");
  return op.call(grad_out, cos, sin);
}

std::tuple<at::Tensor, at::Tensor> blockwise_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       bool causal, int64_t q_chunk, int64_t k_chunk,
                                                       const std::optional<at::Tensor>& segment_ids,
                                                       std::optional<double> scale, int64_t kv_offset) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, int64_t, int64_t,
      const std::optional<at::Tensor>&, std::optional<double>, int64_t)>("bpt::blockwise_attention");
  return op.call(q, k, v, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blockwise_attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal, int64_t q_chunk, int64_t k_chunk,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale, int64_t kv_offset) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const at::Tensor&, bool, int64_t, int64_t, const std::optional<at::Tensor>&,
      std::optional<double>, int64_t)>("bpt::blockwise_attention_backward");
  return op.call(grad_out, grad_lse, q, k, v, out, lse, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
}

at::Tensor blockwise_ffn(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                         const at::Tensor& w_down, int64_t chunk) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, int64_t)>("bpt::blockwise_ffn");
  return op.call(x, w_gate, w_up, w_down, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blockwise_ffn_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down, int64_t chunk) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
      "bpt::blockwise_ffn_backward");
  return op.call(grad_out, x, w_gate, w_up, w_down, chunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_lm_loss(const at::Tensor& h, const at::Tensor& w_head,
                                                               const at::Tensor& targets, int64_t chunk,
                                                               int64_t ignore_index, double z_loss,
                                                               bool float32_logits) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, bool)>(
      "bpt::chunked_lm_loss");
  return op.call(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits);
}

std::tuple<at::Tensor, at::Tensor> chunked_lm_loss_backward(const at::Tensor& grad_loss, const at::Tensor& h,
                                                            const at::Tensor& w_head, const at::Tensor& targets,
                                                            int64_t chunk, int64_t ignore_index, double z_loss,
                                                            bool float32_logits) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, bool)>(
      "bpt::chunked_lm_loss_backward");
  return op.call(grad_loss, h, w_head, targets, chunk, ignore_index, z_loss, float32_logits);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_lm_loss_with_grad(
    const at::Tensor& h, const at::Tensor& w_head, const at::Tensor& targets, int64_t chunk, int64_t ignore_index,
    double z_loss, bool float32_logits) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, double, bool)>(
      "bpt::chunked_lm_loss_with_grad");
  return op.call(h, w_head, targets, chunk, ignore_index, z_loss, float32_logits);
}

at::Tensor bitlinear(const at::Tensor& x, const at::Tensor& weight) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("bpt::bitlinear");
  return op.call(x, weight);
}

std::tuple<at::Tensor, at::Tensor> bitlinear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& weight) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                      const at::Tensor&)>("bpt::bitlinear_backward");
  return op.call(grad_out, x, weight);
}

std::tuple<at::Tensor, at::Tensor> ternary_pack(const at::Tensor& weight) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("bpt::ternary_pack");
  return op.call(weight);
}

at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          int64_t in_features) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
      "bpt::ternary_linear");
  return op.call(x, packed, scale, in_features);
}

at::Tensor moe_dispatch(const at::Tensor& x, const at::Tensor& index) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("bpt::moe_dispatch");
  return op.call(x, index);
}

at::Tensor moe_dispatch_backward(const at::Tensor& grad_out, const at::Tensor& index, int64_t num_tokens) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>("bpt::moe_dispatch_backward");
  return op.call(grad_out, index, num_tokens);
}

at::Tensor moe_combine(const at::Tensor& y, const at::Tensor& index, const at::Tensor& weight, int64_t num_tokens) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>("bpt::moe_combine");
  return op.call(y, index, weight, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                        const at::Tensor& index, const at::Tensor& weight) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>("bpt::moe_combine_backward");
  return op.call(grad_out, y, index, weight);
}

}  // namespace bpt::ops
