// Every bpt op schema, in one place. Kernels are bound per dispatch key (CPU, Meta,
// Autograd, later CUDA) next to each op, in csrc/ops/<op>/.

#include <torch/library.h>

TORCH_LIBRARY(bpt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps=1e-06) -> Tensor");
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rotary_backward(Tensor grad_out, Tensor cos, Tensor sin) -> Tensor");

  // Blockwise Parallel Transformer. A chunk of -1 disables chunking (llamabpt's convention).
  m.def(
      "blockwise_attention(Tensor q, Tensor k, Tensor v, *, bool causal, int q_chunk, int k_chunk, "
      "Tensor? segment_ids=None, float? scale=None, int kv_offset=0) -> (Tensor out, Tensor lse)");
  m.def(
      "blockwise_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, *, bool causal, int q_chunk, int k_chunk, Tensor? segment_ids=None, float? scale=None, "
      "int kv_offset=0) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("blockwise_ffn(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, *, int chunk) -> Tensor");
  m.def(
      "blockwise_ffn_backward(Tensor grad_out, Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, *, int chunk) "
      "-> (Tensor grad_x, Tensor grad_w_gate, Tensor grad_w_up, Tensor grad_w_down)");
  m.def(
      "chunked_lm_loss(Tensor h, Tensor w_head, Tensor targets, *, int chunk, int ignore_index=-100, "
      "float z_loss=0.0, bool float32_logits=True) -> (Tensor loss, Tensor n_tokens, Tensor n_correct)");
  m.def(
      "chunked_lm_loss_backward(Tensor grad_loss, Tensor h, Tensor w_head, Tensor targets, *, int chunk, "
      "int ignore_index=-100, float z_loss=0.0, bool float32_logits=True) -> (Tensor grad_h, Tensor grad_w_head)");
  m.def(
      "chunked_lm_loss_with_grad(Tensor h, Tensor w_head, Tensor targets, *, int chunk, int ignore_index=-100, "
      "float z_loss=0.0, bool float32_logits=True) -> (Tensor loss, Tensor n_tokens, Tensor n_correct, "
      "Tensor grad_h, Tensor grad_w_head)");

  // BitNet b1.58. Training: fake quantization, activations to int8 per token (absmax), weights
  // to ternary (absmean), straight-through gradients. Inference: weights packed 2 bits per
  // value (ternary_pack), int8 x ternary products summed in int32 (ternary_linear).
  m.def("bitlinear(Tensor x, Tensor weight) -> Tensor");
  m.def("bitlinear_backward(Tensor grad_out, Tensor x, Tensor weight) -> (Tensor grad_x, Tensor grad_weight)");
  m.def("ternary_pack(Tensor weight) -> (Tensor packed, Tensor scale)");
  m.def("ternary_linear(Tensor x, Tensor packed, Tensor scale, int in_features) -> Tensor");

  // Mixture of experts: tokens gathered into expert slots (index: the token of each slot) and
  // the experts' outputs summed back per token, weighted by the router.
  m.def("moe_dispatch(Tensor x, Tensor index) -> Tensor");
  m.def("moe_dispatch_backward(Tensor grad_out, Tensor index, int num_tokens) -> Tensor");
  m.def("moe_combine(Tensor y, Tensor index, Tensor weight, int num_tokens) -> Tensor");
  m.def("moe_combine_backward(Tensor grad_out, Tensor y, Tensor index, Tensor weight) -> (Tensor grad_y, Tensor "
        "grad_weight)");
}
