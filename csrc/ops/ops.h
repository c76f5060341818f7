#pragma once
// The bpt ops as C++ functions. Each call goes through the dispatcher (torch.ops.bpt.*),
// so autograd, device kernels and fake tensors behave as they do from Python.

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace bpt::ops {

// x [..., D], weight [D] -> [..., D]; y = weight * cast(x / sqrt(mean(x^2) + eps)).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// -> (grad_x [..., D], grad_weight [D])
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps);

// x [B, H, T, D], cos/sin [T, D] or [B, T, D] -> x * cos + rotate_half(x) * sin, with
// rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]) (Hugging Face layout).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
// grad_out [B, H, T, D] -> grad_x (the map is linear in x).
at::Tensor rotary_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin);

// Blockwise attention (FlashAttention-2 style, O(T) memory). q [B, Hq, T, D], k/v
// [B, Hkv, S, D] with Hq % Hkv == 0, segment_ids [B, S]; query i sits at key position
// kv_offset + i. -> (out [B, Hq, T, D], lse [B, Hq, T] fp32, fp64 for fp64 input).
std::tuple<at::Tensor, at::Tensor> blockwise_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       bool causal, int64_t q_chunk, int64_t k_chunk,
                                                       const std::optional<at::Tensor>& segment_ids = std::nullopt,
                                                       std::optional<double> scale = std::nullopt,
                                                       int64_t kv_offset = 0);
// -> (grad_q, grad_k, grad_v); grad_lse may be absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor> blockwise_attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal, int64_t q_chunk, int64_t k_chunk,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale, int64_t kv_offset);

// SwiGLU feed-forward over chunks of tokens: x [..., D], w_gate/w_up [F, D], w_down [D, F]
// -> (silu(x w_gate^T) * (x w_up^T)) w_down^T, [..., D].
at::Tensor blockwise_ffn(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                         const at::Tensor& w_down, int64_t chunk);
// -> (grad_x, grad_w_gate, grad_w_up, grad_w_down)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> blockwise_ffn_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
    const at::Tensor& w_down, int64_t chunk);

// Mean cross-entropy of h w_head^T against targets without [N, V] logits: h [..., D],
// w_head [V, D], targets [...]. -> (loss fp32 scalar, fp64 for fp64 h; n_tokens, n_correct int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunked_lm_loss(const at::Tensor& h, const at::Tensor& w_head,
                                                               const at::Tensor& targets, int64_t chunk,
                                                               int64_t ignore_index = -100, double z_loss = 0.0,
                                                               bool float32_logits = true);
// -> (grad_h, grad_w_head)
std::tuple<at::Tensor, at::Tensor> chunked_lm_loss_backward(const at::Tensor& grad_loss, const at::Tensor& h,
                                                            const at::Tensor& w_head, const at::Tensor& targets,
                                                            int64_t chunk, int64_t ignore_index, double z_loss,
                                                            bool float32_logits);

// The loss and d loss / d (h, w_head) for grad_loss = 1, in one pass over the logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunked_lm_loss_with_grad(
    const at::Tensor& h, const at::Tensor& w_head, const at::Tensor& targets, int64_t chunk, int64_t ignore_index,
    double z_loss, bool float32_logits);

// BitNet b1.58 fake quantization (training): x [..., K] to int8 per token with the absmax
// scale (x_q = clamp(round(x * 127 / max|x|), -128, 127)), weight [N, K] to ternary with the
// absmean scale (w_q = clamp(round(w / mean|w|), -1, 1)), both dequantized:
// -> (x_q * max|x| / 127) (w_q * mean|w|)^T, [..., N], computed as (x_q w_q^T) (s_w / s_x) so that
// it equals ternary_linear bit for bit in fp32. Gradients pass straight through both
// quantizers: grad_x = grad_out . W_deq, grad_weight = grad_out^T . X_deq.
at::Tensor bitlinear(const at::Tensor& x, const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> bitlinear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const at::Tensor& weight);

// Offline quantization: weight [N, K] float -> (packed uint8 [N, ceil(K / 4)], scale fp32 [] =
// max(mean|weight|, 1e-5)): w_q = clamp(round(weight / scale), -1, 1) stored as w_q + 1 in 2 bits, element
// k of a row in byte k / 4 at bits 2 (k % 4) and up; the padding of the last byte encodes 0.
std::tuple<at::Tensor, at::Tensor> ternary_pack(const at::Tensor& weight);
// Inference: x [..., in_features] float -> [..., N] in x's dtype: x quantized to int8 per token
// as in bitlinear, int8 x ternary products summed in int32, scaled back. Equals bitlinear(x,
// weight) exactly for fp32 x (given the same weight scale).
at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          int64_t in_features);

// Mixture of experts. dispatch: x [N, C], index [M] int64 (the token of each expert slot)
// -> x[index] [M, C]. combine: y [M, C], index [M], weight [M] -> [N, C], row n the sum of
// weight[m] y[m] over the slots m of token n (summed in fp32; 0 for a token with no slot).
at::Tensor moe_dispatch(const at::Tensor& x, const at::Tensor& index);
at::Tensor moe_dispatch_backward(const at::Tensor& grad_out, const at::Tensor& index, int64_t num_tokens);
at::Tensor moe_combine(const at::Tensor& y, const at::Tensor& index, const at::Tensor& weight, int64_t num_tokens);
std::tuple<at::Tensor, at::Tensor> moe_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                        const at::Tensor& index, const at::Tensor& weight);

}  // namespace bpt::ops
