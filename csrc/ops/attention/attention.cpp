// bpt::blockwise_attention: the shared argument front, CPU, CUDA and Meta kernels, autograd.

#include "csrc/ops/attention/attention.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>

#include "csrc/ops/bf16_gemm.h"
#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::ops {
namespace {

constexpr const char* kOp = "bpt::blockwise_attention";

// Every check on shapes, dtypes and options; symbolic-shape safe, so the Meta kernel runs it.
void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_chunk, int64_t k_chunk,
                const std::optional<at::Tensor>& segment_ids, std::optional<double> scale, int64_t kv_offset) {
  check_float(kOp, "q", q);
  check_dim(kOp, "q", q, 4, "[B, Hq, T, D]");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    check_float(kOp, name, t);
    check_dim(kOp, name, t, 4, "[B, Hkv, S, D]");
    check_same_dtype(kOp, name, t, q, "q");
    check_same_device(kOp, name, t, q, "q");
    check_size(kOp, (std::string(name) + ".size(0)").c_str(), t.sym_size(0), q.sym_size(0), "the batch size of q");
    check_size(kOp, (std::string(name) + ".size(3)").c_str(), t.sym_size(3), q.sym_size(3), "the head dim D of q");
  }
  check_size(kOp, "v.size(1)", v.sym_size(1), k.sym_size(1), "k's number of heads Hkv");
  check_size(kOp, "v.size(2)", v.sym_size(2), k.sym_size(2), "k's length S");
  // Two checks: the modulo must not run on Hkv = 0.
  TORCH_SYM_CHECK(k.sym_size(1).sym_gt(0), kOp, ": k must have at least one head, got shape ", k.sym_sizes());
  TORCH_SYM_CHECK((q.sym_size(1) % k.sym_size(1)).sym_eq(0), kOp, ": q's heads Hq = ", q.sym_size(1),
                  " must be a multiple of k's heads Hkv = ", k.sym_size(1));
  check_chunk(kOp, "q_chunk", q_chunk);
  check_chunk(kOp, "k_chunk", k_chunk);
  TORCH_CHECK(kv_offset >= 0, kOp, ": kv_offset must be >= 0, got ", kv_offset);
  // Written as kv_offset <= S - T: kv_offset + T could overflow.
  TORCH_SYM_CHECK((k.sym_size(2) - q.sym_size(2)).sym_ge(kv_offset), kOp, ": kv_offset + T = ", kv_offset, " + ",
                  q.sym_size(2), " must be <= S = ", k.sym_size(2), " (queries are the last positions of the keys)");
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale) && *scale != 0, kOp, ": scale must be finite and non-zero, got ", *scale);
  }
  if (segment_ids.has_value()) {
    const at::Tensor& seg = *segment_ids;
    TORCH_CHECK(seg.scalar_type() == at::kLong || seg.scalar_type() == at::kInt, kOp,
                ": segment_ids must be int64 or int32, got ", seg.scalar_type());
    check_dim(kOp, "segment_ids", seg, 2, "[B, S]");
    check_same_device(kOp, "segment_ids", seg, q, "q");
    check_size(kOp, "segment_ids.size(0)", seg.sym_size(0), q.sym_size(0), "the batch size of q");
    check_size(kOp, "segment_ids.size(1)", seg.sym_size(1), k.sym_size(2), "the key length S");
  }
}

// The tensors the backward receives besides the forward's inputs: shapes and dtypes.
void check_backward_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
                         const at::Tensor& out, const at::Tensor& lse) {
  const std::string op = std::string(kOp) + "_backward";
  check_like(op.c_str(), "grad_out", grad_out, q, "q");
  check_like(op.c_str(), "out", out, q, "q");
  TORCH_CHECK(lse.sym_sizes() == q.sym_sizes().slice(0, 3), op, ": lse must be [B, Hq, T] = ",
              q.sym_sizes().slice(0, 3), ", got ", lse.sym_sizes());
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->sym_sizes() == lse.sym_sizes(), op, ": grad_lse must have lse's shape ", lse.sym_sizes(),
                ", got ", grad_lse->sym_sizes());
  }
}

// The dtype the kernel's GEMMs read: bf16 stays bf16 where the CPU has bf16 dot products
// (ATEN_CPU_CAPABILITY below avx512 turns that off), everything else computes in opmath.
at::ScalarType compute_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 && cpu::bf16_gemm_available() ? at::kBFloat16 : accumulate_type(t);
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 bool causal, int64_t q_chunk, int64_t k_chunk,
                                                 const std::optional<at::Tensor>& segment_ids,
                                                 std::optional<double> scale, int64_t kv_offset) {
  const AttentionParams p = make_attention_params(q, k, v, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  const auto opmath = accumulate_type(q);
  const auto opts = q.options().dtype(opmath);
  at::Tensor out = at::empty({p.batch, p.q_heads, p.q_len, p.head_dim}, opts);
  at::Tensor lse = at::empty({p.batch, p.q_heads, p.q_len}, opts);
  const at::Tensor seg = p.has_segments ? segment_ids->to(at::kLong).contiguous() : at::Tensor();
  const auto compute = compute_type_of(q);
  cpu::attention_forward_kernel()(p, q.to(compute).contiguous(), k.to(compute).contiguous(),
                                  v.to(compute).contiguous(), seg, out, lse);
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal, int64_t q_chunk, int64_t k_chunk,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale, int64_t kv_offset) {
  const AttentionParams p = make_attention_params(q, k, v, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  check_backward_args(grad_out, grad_lse, q, out, lse);
  const auto opmath = accumulate_type(q), compute = compute_type_of(q);
  // delta_i = sum_d dO_id O_id - dL/dlse_i: the softmax backward's row term, folded with lse's own gradient.
  at::Tensor delta = (grad_out.to(opmath) * out.to(opmath)).sum(-1);
  if (grad_lse.has_value() && grad_lse->defined()) delta = delta - grad_lse->to(opmath);
  const auto opts = q.options().dtype(opmath);
  at::Tensor grad_q = at::zeros({p.batch, p.q_heads, p.q_len, p.head_dim}, opts);
  // One backward task per kv head when that gives every thread work; otherwise per query
  // head, with each head's dK/dV slice kept apart and summed over the group below.
  const int64_t grad_heads = p.batch * p.kv_heads >= at::get_num_threads() ? p.kv_heads : p.q_heads;
  at::Tensor grad_k = at::zeros({p.batch, grad_heads, p.kv_len, p.head_dim}, opts);
  at::Tensor grad_v = at::zeros({p.batch, grad_heads, p.kv_len, p.head_dim}, opts);
  const at::Tensor seg = p.has_segments ? segment_ids->to(at::kLong).contiguous() : at::Tensor();
  cpu::attention_backward_kernel()(p, grad_out.to(compute).contiguous(), q.to(compute).contiguous(),
                                   k.to(compute).contiguous(), v.to(compute).contiguous(), lse.to(opmath).contiguous(),
                                   delta.contiguous(), seg, grad_q, grad_k, grad_v);
  if (grad_heads != p.kv_heads) {  // sum each kv head's gradient over the query heads that share it
    grad_k = grad_k.view({p.batch, p.kv_heads, p.group(), p.kv_len, p.head_dim}).sum(2);
    grad_v = grad_v.view({p.batch, p.kv_heads, p.group(), p.kv_len, p.head_dim}).sum(2);
  }
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type())};
}

// The tiled tensor-core kernels where a CUDA build has them and they are enabled, else the
// ATen blocks (attention_generic.cpp).
std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  bool causal, int64_t q_chunk, int64_t k_chunk,
                                                  const std::optional<at::Tensor>& segment_ids,
                                                  std::optional<double> scale, int64_t kv_offset) {
  const AttentionParams p = make_attention_params(q, k, v, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  const at::Tensor seg = segment_ids.value_or(at::Tensor());
  at::Tensor out, lse;
  if (tiled_attention_forward() != nullptr && tiled_attention_forward()(p, q, k, v, seg, out, lse)) return {out, lse};
  return generic::attention_forward(p, q, k, v, seg);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal, int64_t q_chunk, int64_t k_chunk,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale, int64_t kv_offset) {
  const AttentionParams p = make_attention_params(q, k, v, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  check_backward_args(grad_out, grad_lse, q, out, lse);
  const at::Tensor glse = grad_lse.value_or(at::Tensor()), seg = segment_ids.value_or(at::Tensor());
  at::Tensor grad_q, grad_k, grad_v;
  if (tiled_attention_backward() != nullptr &&
      tiled_attention_backward()(p, grad_out, glse, q, k, v, out, lse, seg, grad_q, grad_k, grad_v)) {
    return {grad_q, grad_k, grad_v};
  }
  return generic::attention_backward(p, grad_out, glse, q, k, v, out, lse, seg);
}

std::tuple<at::Tensor, at::Tensor> attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  bool causal, int64_t q_chunk, int64_t k_chunk,
                                                  const std::optional<at::Tensor>& segment_ids,
                                                  std::optional<double> scale, int64_t kv_offset) {
  check_args(q, k, v, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint(q.sym_sizes().slice(0, 3), q.options().dtype(accumulate_type(q)))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_meta(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal, int64_t q_chunk, int64_t k_chunk,
    const std::optional<at::Tensor>& segment_ids, std::optional<double> scale, int64_t kv_offset) {
  check_args(q, k, v, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  check_backward_args(grad_out, grad_lse, q, out, lse);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

// Saves q, k, v, out and lse: O(T * D) per head; the backward recomputes the scores.
class BlockwiseAttentionFunction : public torch::autograd::Function<BlockwiseAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v, bool causal,
                                                int64_t q_chunk, int64_t k_chunk,
                                                const std::optional<at::Tensor>& segment_ids,
                                                std::optional<double> scale, int64_t kv_offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = ops::blockwise_attention(q, k, v, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["q_chunk"] = q_chunk;
    ctx->saved_data["k_chunk"] = k_chunk;
    ctx->saved_data["segment_ids"] = segment_ids;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["kv_offset"] = kv_offset;
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &out = saved[3];
    if (!grads[0].defined() && !grads[1].defined()) return std::vector<at::Tensor>(9);
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const auto& d = ctx->saved_data;
    auto [grad_q, grad_k, grad_v] = ops::blockwise_attention_backward(
        grad_out, grads[1].defined() ? std::optional<at::Tensor>(grads[1]) : std::nullopt, q, saved[1], saved[2],
        out, saved[4], d.at("causal").toBool(), d.at("q_chunk").toInt(), d.at("k_chunk").toInt(),
        d.at("segment_ids").toOptional<at::Tensor>(), d.at("scale").toOptional<double>(), d.at("kv_offset").toInt());
    return {grad_q, grad_k, grad_v, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, int64_t q_chunk, int64_t k_chunk,
                                                      const std::optional<at::Tensor>& segment_ids,
                                                      std::optional<double> scale, int64_t kv_offset) {
  auto outs = BlockwiseAttentionFunction::apply(q, k, v, causal, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  return {outs[0], outs[1]};
}

}  // namespace

tiled_attention_fn*& tiled_attention_forward() {
  static tiled_attention_fn* kernel = nullptr;
  return kernel;
}

tiled_attention_backward_fn*& tiled_attention_backward() {
  static tiled_attention_backward_fn* kernel = nullptr;
  return kernel;
}

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                                      int64_t q_chunk, int64_t k_chunk,
                                      const std::optional<at::Tensor>& segment_ids, std::optional<double> scale,
                                      int64_t kv_offset) {
  check_args(q, k, v, q_chunk, k_chunk, segment_ids, scale, kv_offset);
  AttentionParams p;
  p.batch = q.size(0);
  p.q_heads = q.size(1);
  p.kv_heads = k.size(1);
  p.q_len = q.size(2);
  p.kv_len = k.size(2);
  p.head_dim = q.size(3);
  p.causal = causal;
  p.q_chunk = resolve_chunk(q_chunk, p.q_len);
  p.k_chunk = resolve_chunk(k_chunk, p.kv_len);
  p.scale = scale.value_or(p.head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(p.head_dim)) : 1.0);
  p.kv_offset = kv_offset;
  p.has_segments = segment_ids.has_value();
  return p;
}

TORCH_LIBRARY_IMPL(bpt, CPU, m) {
  m.impl("blockwise_attention", &attention_cpu);
  m.impl("blockwise_attention_backward", &attention_backward_cpu);
}

TORCH_LIBRARY_IMPL(bpt, CUDA, m) {
  m.impl("blockwise_attention", &attention_cuda);
  m.impl("blockwise_attention_backward", &attention_backward_cuda);
}

TORCH_LIBRARY_IMPL(bpt, Meta, m) {
  m.impl("blockwise_attention", &attention_meta);
  m.impl("blockwise_attention_backward", &attention_backward_meta);
}

TORCH_LIBRARY_IMPL(bpt, Autograd, m) { m.impl("blockwise_attention", &attention_autograd); }

}  // namespace bpt::ops
