// bpt-demo: runs the bpt ops on a real input through the C++ modules, checks them against
// the plain ATen expressions, and prints what it measured.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/version.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>

#include "csrc/nn/blockwise_attention.h"
#include "csrc/nn/rms_norm.h"
#include "csrc/nn/rotary.h"
#include "csrc/ops/ops.h"

namespace {

// Median-free quick timing: the mean of `reps` calls after one warm-up, in ms.
template <typename Fn>
double time_ms(Fn&& fn, int reps = 20) {
  fn();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) fn();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / reps;
}

int run() {
  const int64_t B = 1, H = 8, T = 2048, D = 128, C = H * D;
  std::printf("bpt demo: ATen %s, %d threads, CPU capability %s\n", TORCH_VERSION, at::get_num_threads(),
              at::get_cpu_capability().c_str());
  at::manual_seed(0);

  bpt::nn::RMSNorm norm(C);
  bpt::nn::Rotary rope(D);
  const at::Tensor hidden = at::randn({B, T, C});
  const at::Tensor positions = at::arange(T, at::kLong).unsqueeze(0);

  const at::Tensor normed = norm(hidden);
  const at::Tensor normed_ref = hidden * at::rsqrt(hidden.pow(2).mean(-1, true) + 1e-6);
  const at::Tensor q = normed.view({B, T, H, D}).transpose(1, 2);  // [B, H, T, D]
  const at::Tensor q_rot = rope(q, positions);
  auto [cos, sin] = rope->cos_sin(positions, at::kFloat);
  const auto halves = q.chunk(2, -1);
  const at::Tensor q_rot_ref = q * cos.unsqueeze(1) + at::cat({-halves[1], halves[0]}, -1) * sin.unsqueeze(1);

  std::printf("rms_norm  [%lld, %lld, %lld]    max |bpt - aten| = %.2e\n", (long long)B, (long long)T,
              (long long)C, (normed - normed_ref).abs().max().item<double>());
  std::printf("rotary    [%lld, %lld, %lld, %lld] max |bpt - aten| = %.2e\n", (long long)B, (long long)H,
              (long long)T, (long long)D, (q_rot - q_rot_ref).abs().max().item<double>());

  // Causal attention over the rotated heads, blockwise against the [T, T] materialised math.
  bpt::nn::BlockwiseAttention attention(bpt::nn::BlockwiseAttentionOptions().causal(true).q_chunk(256).k_chunk(256));
  const at::Tensor attn = attention(q_rot, q_rot, q_rot);
  const at::Tensor scores = at::matmul(q_rot, q_rot.transpose(-1, -2)) / std::sqrt(double(D));
  const at::Tensor future = at::ones({T, T}, at::kBool).triu(1);
  const at::Tensor attn_ref = at::matmul(at::softmax(scores.masked_fill(future, -INFINITY), -1), q_rot);
  std::printf("attention [%lld, %lld, %lld, %lld] causal, max |bpt - aten| = %.2e (bpt keeps 256x256 score "
              "blocks; the reference held a %lld x %lld matrix per head)\n",
              (long long)B, (long long)H, (long long)T, (long long)D, (attn - attn_ref).abs().max().item<double>(),
              (long long)T, (long long)T);

  const at::Tensor hidden_bf16 = hidden.to(at::kBFloat16);
  const at::Tensor w_bf16 = norm->weight.to(at::kBFloat16);
  auto aten_rms = [&](const at::Tensor& x, const at::Tensor& w) {
    const at::Tensor xf = x.to(at::kFloat);
    return w * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + 1e-6)).to(x.scalar_type());
  };
  at::NoGradGuard no_grad;
  for (const auto& [name, x, w] : {std::tuple{"fp32", hidden, norm->weight}, std::tuple{"bf16", hidden_bf16, w_bf16}}) {
    const double bpt_ms = time_ms([&] { return bpt::ops::rms_norm(x, w, 1e-6); });
    const double aten_ms = time_ms([&] { return aten_rms(x, w); });
    std::printf("rms_norm %s forward: bpt %.3f ms, aten expression %.3f ms (bpt %.2fx as fast)\n", name, bpt_ms, aten_ms,
                aten_ms / bpt_ms);
  }
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor qd = q_rot.to(dtype);
    const double bpt_ms = time_ms([&] { return attention(qd, qd, qd); }, 5);
    const double sdpa_ms =
        time_ms([&] { return at::scaled_dot_product_attention(qd, qd, qd, {}, 0.0, /*is_causal=*/true); }, 5);
    std::printf("attention %s forward, T=%lld: bpt %.1f ms, at::scaled_dot_product_attention %.1f ms (bpt %.2fx as fast)\n",
                dtype == at::kFloat ? "fp32" : "bf16", (long long)T, bpt_ms, sdpa_ms, sdpa_ms / bpt_ms);
  }
  return 0;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bpt-demo: %s\n", e.what());
    return 1;
  }
}
