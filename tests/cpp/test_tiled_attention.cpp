// The tiled tensor-core attention kernels (csrc/ops/attention/attention_{forward,backward}.cuh),
// compiled as host C++ and run on the CPU under tests/cpp/cuda_emulation.h, against fp64
// attention and its gradients. This checks what the kernels compute (tiles, WMMA operand
// layouts, masks, online softmax, the FlashAttention-2 backward) on every CI run; a missing
// barrier shows only if the threads interleave badly, and a GPU's own behaviour (memory model,
// real fragment layouts, speed) is for tests/python/test_cuda.py on a GPU.

#include "tests/cpp/cuda_emulation.h"  // first: CUDA's keywords, built-ins and WMMA on the CPU

#include <ATen/ATen.h>
#include <catch2/catch.hpp>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <vector>

#include "csrc/ops/attention/attention_backward.cuh"
#include "csrc/ops/attention/attention_forward.cuh"
#include "tests/cpp/helpers.h"

namespace {

namespace tiles = bpt::ops::tiles;

struct Case {
  bool causal;
  int64_t group, head_dim, q_len, kv_len, kv_offset;
  bool segments;
  int64_t kv_heads = 1;
  at::ScalarType dtype = at::kBFloat16;
  bool lse_gradient = true;  // false: grad_lse undefined, as when only out is used
};

struct Result {
  at::Tensor out, lse, grad_q, grad_k, grad_v;
};

// Softmax attention in fp64 with an explicit mask, and the gradients of
// sum(out * grad_out) + sum(lse * grad_lse).
Result reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& segment_ids,
                 const Case& c, const at::Tensor& grad_out, const at::Tensor& grad_lse) {
  const at::Tensor qd = q.to(at::kDouble).requires_grad_(), kd = k.to(at::kDouble).requires_grad_(),
                   vd = v.to(at::kDouble).requires_grad_();
  const at::Tensor kk = kd.repeat_interleave(c.group, 1), vv = vd.repeat_interleave(c.group, 1);
  at::Tensor scores = at::matmul(qd, kk.transpose(-1, -2)) / std::sqrt(static_cast<double>(c.head_dim));
  const at::Tensor query_pos = at::arange(c.q_len, at::kLong) + c.kv_offset, key_pos = at::arange(c.kv_len, at::kLong);
  at::Tensor visible = at::ones({q.size(0), 1, c.q_len, c.kv_len}, at::kBool);
  if (c.causal) visible = visible & key_pos.view({1, -1}).le(query_pos.view({-1, 1})).view({1, 1, c.q_len, c.kv_len});
  if (segment_ids.defined()) {
    const at::Tensor query_doc = segment_ids.index_select(1, query_pos).unsqueeze(2);
    visible = visible & query_doc.eq(segment_ids.unsqueeze(1)).unsqueeze(1);
  }
  scores = scores.masked_fill(visible.logical_not(), -INFINITY);
  const at::Tensor out = at::matmul(at::softmax(scores, -1), vv), lse = at::logsumexp(scores, -1);
  at::Tensor loss = (out * grad_out.to(at::kDouble)).sum();
  if (grad_lse.defined()) loss = loss + (lse * grad_lse.to(at::kDouble)).sum();
  const auto grads = torch::autograd::grad({loss}, {qd, kd, vd});
  return {out.detach(), lse.detach(), grads[0], grads[1], grads[2]};
}

// The forward kernel, the delta kernel and the backward kernel, launched as
// attention_forward.cu and attention_backward.cu launch them.
template <typename Element, int D>
Result tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& segment_ids,
             const Case& c, const at::Tensor& grad_out, const at::Tensor& grad_lse) {
  const int64_t batch = q.size(0), q_heads = q.size(1), kv_heads = k.size(1);
  const tiles::KernelParams p{q_heads, kv_heads, c.q_len, c.kv_len, c.kv_offset, c.causal,
                              static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)))};
  const int64_t* segments = segment_ids.defined() ? segment_ids.const_data_ptr<int64_t>() : nullptr;
  const auto tiles_of = [](int64_t n) { return static_cast<unsigned int>((n + 63) / 64); };

  at::Tensor out = at::empty_like(q), lse = at::empty({batch, q_heads, c.q_len}, at::kFloat);
  bpt::emulation::launch(dim3(tiles_of(c.q_len), q_heads, batch), dim3(tiles::kThreads),
                         tiles::forward_shared_bytes<D>(sizeof(Element)), tiles::attention_forward_tiled<Element, D>,
                         p, q.const_data_ptr<Element>(), k.const_data_ptr<Element>(), v.const_data_ptr<Element>(),
                         segments, out.mutable_data_ptr<Element>(), lse.mutable_data_ptr<float>());

  const int64_t rows = batch * q_heads * c.q_len;
  at::Tensor delta = at::empty({batch, q_heads, c.q_len}, at::kFloat);
  bpt::emulation::launch(dim3(static_cast<unsigned int>((rows + tiles::kWarps - 1) / tiles::kWarps)),
                         dim3(tiles::kThreads), 0, tiles::softmax_row_terms<Element>,
                         grad_out.const_data_ptr<Element>(),
                         out.const_data_ptr<Element>(), grad_lse.defined() ? grad_lse.const_data_ptr<float>() : nullptr,
                         rows, D,
                         delta.mutable_data_ptr<float>());

  at::Tensor grad_q = at::zeros({batch, q_heads, c.q_len, D}, at::kFloat);
  at::Tensor grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  bpt::emulation::launch(dim3(tiles_of(c.kv_len), kv_heads, batch), dim3(tiles::kThreads),
                         tiles::backward_shared_bytes<D>(sizeof(Element)), tiles::attention_backward_tiled<Element, D>,
                         p, q.const_data_ptr<Element>(), k.const_data_ptr<Element>(), v.const_data_ptr<Element>(),
                         grad_out.const_data_ptr<Element>(), lse.const_data_ptr<float>(),
                         delta.const_data_ptr<float>(), segments, grad_q.mutable_data_ptr<float>(),
                         grad_k.mutable_data_ptr<Element>(), grad_v.mutable_data_ptr<Element>());
  return {out, lse, grad_q, grad_k, grad_v};
}

}  // namespace

TEST_CASE("tiled attention kernels on the CPU emulator match fp64 attention and its gradients",
          "[attention][cuda_emulation]") {
  // Lengths that are not multiples of 64 (padded rows and keys) and are, GQA groups 1, 2, 4,
  // kv_offset with a decode step, key tiles after the last query (seen by none), non-causal
  // with segments, and different documents in each batch row.
  const std::vector<Case> cases = {
      {true, 1, 64, 37, 37, 0, false},  {true, 4, 128, 100, 130, 30, true}, {true, 2, 64, 1, 65, 64, false},
      {false, 2, 128, 50, 90, 40, true}, {true, 2, 64, 40, 200, 20, true},  {true, 1, 64, 128, 128, 0, true},
      // Two kv heads in fp16 (the kernels' __half), out's gradient alone.
      {true, 2, 64, 70, 80, 10, true, 2, at::kHalf, false},
  };
  at::manual_seed(0);
  for (const Case& c : cases) {
    INFO("causal " << c.causal << ", group " << c.group << ", D " << c.head_dim << ", T " << c.q_len << ", S "
                   << c.kv_len << ", kv_offset " << c.kv_offset << ", segments " << c.segments << ", kv heads "
                   << c.kv_heads << ", " << c.dtype << ", lse gradient " << c.lse_gradient);
    const int64_t batch = 2, kv_heads = c.kv_heads;
    const auto random = [&](at::IntArrayRef shape) { return at::randn(shape).to(c.dtype); };
    const at::Tensor q = random({batch, kv_heads * c.group, c.q_len, c.head_dim});
    const at::Tensor k = random({batch, kv_heads, c.kv_len, c.head_dim});
    const at::Tensor v = random({batch, kv_heads, c.kv_len, c.head_dim});
    const at::Tensor grad_out = random(q.sizes());
    const at::Tensor grad_lse = c.lse_gradient ? at::randn({batch, kv_heads * c.group, c.q_len}) : at::Tensor();
    at::Tensor segment_ids;
    if (c.segments) {
      const at::Tensor position = at::arange(c.kv_len, at::kLong);
      segment_ids = at::stack({position.ge(c.kv_len / 3), position.ge(c.kv_len / 2)}).to(at::kLong);
    }
    const Result want = reference(q, k, v, segment_ids, c, grad_out, grad_lse);
    const auto run = [&](auto element) {
      using Element = decltype(element);  // the kernels' __nv_bfloat16 or __half here
      return c.head_dim == 64 ? tiled<Element, 64>(q, k, v, segment_ids, c, grad_out, grad_lse)
                              : tiled<Element, 128>(q, k, v, segment_ids, c, grad_out, grad_lse);
    };
    const Result got = c.dtype == at::kHalf ? run(c10::Half{}) : run(c10::BFloat16{});
    // 16-bit inputs, P and dS in 16 bits for the tensor-core products, fp32 sums.
    bpt::test::require_close(got.out, want.out, 3e-2, 3e-2);
    bpt::test::require_close(got.lse, want.lse, 1e-2, 1e-2);
    bpt::test::require_close(got.grad_q, want.grad_q, 5e-2, 5e-2);
    bpt::test::require_close(got.grad_k, want.grad_k, 5e-2, 5e-2);
    bpt::test::require_close(got.grad_v, want.grad_v, 5e-2, 5e-2);
  }
}
