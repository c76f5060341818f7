// bpt::blockwise_attention in ATen calls, for any device: the CUDA kernel until a tiled
// tensor-core one replaces it, and a second implementation the CPU kernel is tested against.
// Same blocks as the CPU kernel: a query chunk against each key chunk it can see, with the
// online softmax in opmath; the backward recomputes each block's probabilities from lse
// (FlashAttention-2's order: dV, dP, dS, then dQ and dK).
//
// GQA without copies of K and V: a query chunk's rows of the G heads that share a kv head are
// stacked, [B, Hkv, G x len, D], so each block is one batched matmul against [B, Hkv, S, D].

#include <ATen/ATen.h>

#include <limits>

#include "csrc/ops/attention/attention.h"
#include "csrc/ops/checks.h"

namespace bpt::generic {
namespace {

using ops::AttentionParams;

struct Span {
  int64_t start = 0, len = 0;
  int64_t end() const { return start + len; }
};

std::vector<Span> spans(int64_t length, int64_t chunk) {
  std::vector<Span> result;
  for (int64_t start = 0; start < length; start += chunk) result.push_back({start, std::min(chunk, length - start)});
  return result;
}

// Rows [q.start, q.end) of every query head of t [B, Hq, T, ...], grouped by kv head:
// [B, Hkv, G x len, ...] (row g len + i: head kvh G + g, position q.start + i).
at::Tensor grouped(const at::Tensor& t, const AttentionParams& p, const Span& q) {
  std::vector<int64_t> shape{p.batch, p.kv_heads, p.group() * q.len};
  for (int64_t d = 3; d < t.dim(); ++d) shape.push_back(t.size(d));
  return t.narrow(2, q.start, q.len).reshape(shape);
}

// The inverse: [B, Hkv, G x len, ...] -> [B, Hq, len, ...].
at::Tensor ungrouped(const at::Tensor& t, const AttentionParams& p, const Span& q) {
  std::vector<int64_t> shape{p.batch, p.q_heads, q.len};
  for (int64_t d = 3; d < t.dim(); ++d) shape.push_back(t.size(d));
  return t.reshape(shape);
}

// Whether the block (query span q, key span k) has any visible pair, and the mask of the
// hidden ones ([B or 1, 1, G x len, klen], true: hidden), undefined when every pair is visible.
struct BlockMask {
  bool visible = true;
  at::Tensor hidden;
};

BlockMask block_mask(const AttentionParams& p, const at::Tensor& segment_ids, const Span& q, const Span& k,
                     const at::TensorOptions& device) {
  const int64_t first_query = p.kv_offset + q.start, last_query = p.kv_offset + q.end() - 1;
  if (p.causal && k.start > last_query) return {false, {}};
  const bool causal_cut = p.causal && k.end() - 1 > first_query;
  if (!causal_cut && !p.has_segments) return {};
  const auto index = device.dtype(at::kLong);
  at::Tensor hidden = at::zeros({1, q.len, k.len}, device.dtype(at::kBool));
  if (causal_cut) {  // key j after query i's position
    const at::Tensor query_pos = at::arange(first_query, last_query + 1, index).view({1, q.len, 1});
    const at::Tensor key_pos = at::arange(k.start, k.end(), index).view({1, 1, k.len});
    hidden = hidden | (key_pos > query_pos);
  }
  if (p.has_segments) {  // another document
    const at::Tensor query_doc = segment_ids.narrow(1, first_query, q.len).unsqueeze(2);
    const at::Tensor key_doc = segment_ids.narrow(1, k.start, k.len).unsqueeze(1);
    hidden = hidden | (query_doc != key_doc);
  }
  // [B|1, len, klen] -> [B|1, 1, G x len, klen]: the same for every head of the group.
  const int64_t b = hidden.size(0);
  hidden = hidden.unsqueeze(1).expand({b, p.group(), q.len, k.len}).reshape({b, 1, p.group() * q.len, k.len});
  return {true, hidden};
}

// scale q k^T over one block, hidden pairs at -inf.
at::Tensor scores(const at::Tensor& qg, const at::Tensor& kc, const BlockMask& mask, double scale) {
  at::Tensor s = at::matmul(qg, kc.transpose(-1, -2)).mul_(scale);
  if (mask.hidden.defined()) s.masked_fill_(mask.hidden, -std::numeric_limits<double>::infinity());
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const AttentionParams& p, const at::Tensor& q,
                                                     const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& segment_ids) {
  const auto opmath = ops::accumulate_type(q);
  const at::Tensor qf = q.to(opmath), kf = k.to(opmath), vf = v.to(opmath);
  const at::Tensor seg = p.has_segments ? segment_ids.to(at::kLong) : at::Tensor();
  at::Tensor out = at::empty({p.batch, p.q_heads, p.q_len, p.head_dim}, qf.options());
  at::Tensor lse = at::empty({p.batch, p.q_heads, p.q_len}, qf.options());
  const double inf = std::numeric_limits<double>::infinity();
  for (const Span& qs : spans(p.q_len, p.q_chunk)) {
    const at::Tensor qg = grouped(qf, p, qs);
    at::Tensor m = at::full({p.batch, p.kv_heads, p.group() * qs.len, 1}, -inf, qf.options());
    at::Tensor l = at::zeros_like(m);
    at::Tensor acc = at::zeros({p.batch, p.kv_heads, p.group() * qs.len, p.head_dim}, qf.options());
    for (const Span& ks : spans(p.kv_len, p.k_chunk)) {
      const BlockMask mask = block_mask(p, seg, qs, ks, qf.options());
      if (!mask.visible) continue;
      const at::Tensor s = scores(qg, kf.narrow(2, ks.start, ks.len), mask, p.scale);
      const at::Tensor m_new = at::maximum(m, s.amax(-1, /*keepdim=*/true));
      const at::Tensor shift = m_new.masked_fill(m_new == -inf, 0);  // rows with nothing visible yet
      const at::Tensor probs = (s - shift).exp_();
      const at::Tensor rescale = (m - shift).exp_();
      l = l * rescale + probs.sum(-1, /*keepdim=*/true);
      acc = acc * rescale + at::matmul(probs, vf.narrow(2, ks.start, ks.len));
      m = m_new;
    }
    // Every query sees at least its own position, so l > 0.
    out.narrow(2, qs.start, qs.len).copy_(ungrouped(acc / l, p, qs));
    lse.narrow(2, qs.start, qs.len).copy_(ungrouped((m + l.log()).squeeze(-1), p, qs));
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const AttentionParams& p,
                                                                  const at::Tensor& grad_out,
                                                                  const at::Tensor& grad_lse, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  const at::Tensor& segment_ids) {
  const auto opmath = ops::accumulate_type(q);
  const at::Tensor qf = q.to(opmath), kf = k.to(opmath), vf = v.to(opmath), dof = grad_out.to(opmath);
  const at::Tensor seg = p.has_segments ? segment_ids.to(at::kLong) : at::Tensor();
  // delta_i = sum_d dO_id O_id - dL/dlse_i: the softmax backward's row term, with lse's own gradient.
  at::Tensor delta = (dof * out.to(opmath)).sum(-1);
  if (grad_lse.defined()) delta = delta - grad_lse.to(opmath);
  const at::Tensor lsef = lse.to(opmath);
  at::Tensor grad_q = at::empty_like(qf), grad_k = at::zeros_like(kf), grad_v = at::zeros_like(vf);
  for (const Span& qs : spans(p.q_len, p.q_chunk)) {
    const at::Tensor qg = grouped(qf, p, qs), dog = grouped(dof, p, qs);
    const at::Tensor lse_g = grouped(lsef, p, qs).unsqueeze(-1), delta_g = grouped(delta, p, qs).unsqueeze(-1);
    at::Tensor dq = at::zeros_like(qg);
    for (const Span& ks : spans(p.kv_len, p.k_chunk)) {
      const BlockMask mask = block_mask(p, seg, qs, ks, qf.options());
      if (!mask.visible) continue;
      const at::Tensor kc = kf.narrow(2, ks.start, ks.len), vc = vf.narrow(2, ks.start, ks.len);
      const at::Tensor probs = (scores(qg, kc, mask, p.scale) - lse_g).exp_();
      grad_v.narrow(2, ks.start, ks.len).add_(at::matmul(probs.transpose(-1, -2), dog));
      const at::Tensor ds = probs * (at::matmul(dog, vc.transpose(-1, -2)) - delta_g);
      dq.add_(at::matmul(ds, kc), p.scale);
      grad_k.narrow(2, ks.start, ks.len).add_(at::matmul(ds.transpose(-1, -2), qg), p.scale);
    }
    grad_q.narrow(2, qs.start, qs.len).copy_(ungrouped(dq, p, qs));
  }
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type())};
}

}  // namespace bpt::generic
