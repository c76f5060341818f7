#include "csrc/nn/moe.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "csrc/nn/checkpoint.h"
#include "csrc/ops/checks.h"
#include "csrc/ops/ops.h"

namespace bpt::nn {

int64_t expert_capacity(double factor, int64_t top_k, int64_t tokens, int64_t num_experts) {
  if (factor == 0) return -1;
  return static_cast<int64_t>(std::ceil(factor * static_cast<double>(top_k * tokens) / static_cast<double>(num_experts)));
}

Routing route(const at::Tensor& logits, int64_t top_k, int64_t capacity) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "route: logits must be fp32 [N, E], got ",
              logits.scalar_type(), " ", logits.sizes());
  const int64_t N = logits.size(0), E = logits.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "route: top_k must be in [1, ", E, "], got ", top_k);
  const at::Tensor probs = at::softmax(logits, -1);
  const auto [top_probs, top_experts] = probs.topk(top_k, -1);
  // k > 1: renormalised (GShard, Mixtral). k = 1 keeps the probability itself (Switch): a
  // weight of exactly 1 would give the router no gradient from the loss.
  const at::Tensor weights = top_k > 1 ? top_probs / top_probs.sum(-1, /*keepdim=*/true) : top_probs;

  // Slots in priority order: every token's first choice, then every token's second, ...
  const at::Tensor experts = top_experts.t().reshape({-1});  // [k N], slot j N + n
  const at::Tensor slot_weights = weights.t().reshape({-1});
  const at::Tensor slot_tokens = at::arange(N, logits.options().dtype(at::kLong)).repeat({top_k});
  at::Tensor kept = at::arange(top_k * N, slot_tokens.options());
  if (capacity >= 0) {
    // A slot's place in its expert's queue: the slots before it (in priority order) with the
    // same expert.
    const at::Tensor one_hot = at::one_hot(experts, E);
    const at::Tensor position = (one_hot.cumsum(0) * one_hot).sum(1) - 1;
    kept = (position < capacity).nonzero().squeeze(1);
  }
  // Grouped by expert, each group in priority order (a stable sort).
  const at::Tensor order = std::get<1>(experts.index_select(0, kept).sort(std::optional<bool>(true), 0));
  const at::Tensor slots = kept.index_select(0, order);

  Routing routing;
  routing.token = slot_tokens.index_select(0, slots);
  routing.weight = slot_weights.index_select(0, slots);
  const at::Tensor counts = at::bincount(experts.index_select(0, slots), {}, E).cpu();  // slice sizes, on the host
  routing.counts.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + E);
  routing.dropped_fraction = N == 0 ? 0.0 : 1.0 - static_cast<double>(slots.size(0)) / static_cast<double>(top_k * N);

  if (N == 0) {  // no token: no loss (a mean over nothing would be NaN)
    routing.aux_loss = routing.z_loss = logits.sum();
    return routing;
  }
  const at::Tensor chosen = at::bincount(experts, {}, E).to(at::kFloat) / static_cast<double>(N);  // f_e: sums to k
  routing.aux_loss = (chosen * probs.mean(0)).sum() * static_cast<double>(E);
  routing.z_loss = at::logsumexp(logits, {-1}).pow(2).mean();
  return routing;
}

// ---- experts

MoEExpertImpl::MoEExpertImpl(int64_t dim_, int64_t hidden_dim_, std::string activation_, int64_t chunk_)
    : dim(dim_), hidden_dim(hidden_dim_), activation(std::move(activation_)), chunk(chunk_) {
  reset();
}

void MoEExpertImpl::reset() {
  TORCH_CHECK(activation == "silu" || activation == "gelu", "MoE: activation must be silu (SwiGLU experts) or gelu, "
              "got '", activation, "'");
  const auto linear = [](int64_t in, int64_t out) { return torch::nn::LinearOptions(in, out).bias(false); };
  w1 = register_module("w1", torch::nn::Linear(linear(dim, hidden_dim)));
  w2 = register_module("w2", torch::nn::Linear(linear(hidden_dim, dim)));
  if (activation == "silu") w3 = register_module("w3", torch::nn::Linear(linear(dim, hidden_dim)));
}

at::Tensor MoEExpertImpl::forward(const at::Tensor& x) {
  if (activation == "silu") return ops::blockwise_ffn(x, w1->weight, w3->weight, w2->weight, chunk);
  // GELU experts, chunked as the blockwise FFN is: `chunk` rows at a time, each chunk's hidden
  // activations recomputed in backward rather than kept.
  const TensorFn mlp = [this](const std::vector<at::Tensor>& rows) {
    return std::vector<at::Tensor>{w2(at::gelu(w1(rows[0])))};
  };
  if (chunk <= 0) return mlp({x})[0];
  std::vector<at::Tensor> outputs;
  for (int64_t start = 0; start < x.size(0); start += chunk) {
    outputs.push_back(checkpoint(mlp, {x.narrow(0, start, std::min(chunk, x.size(0) - start))})[0]);
  }
  return outputs.size() == 1 ? outputs[0] : at::cat(outputs);
}

// ---- layer

MoELayerImpl::MoELayerImpl(const MoEOptions& options_) : options(options_) { reset(); }

void MoELayerImpl::reset() {
  const int64_t E = options.num_experts();
  TORCH_CHECK(options.dim() > 0 && options.hidden_dim() > 0, "MoE: dim and hidden_dim must be positive");
  TORCH_CHECK(E >= 1 && options.top_k() >= 1 && options.top_k() <= E, "MoE: top_k must be in [1, num_experts = ", E,
              "], got ", options.top_k());
  TORCH_CHECK(options.capacity_factor() >= 0 && options.eval_capacity_factor() >= 0,
              "MoE: capacity factors must be >= 0 (0: dropless)");
  ops::check_chunk("MoE", "chunk", options.chunk());
  gate = register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(options.dim(), E).bias(false)));
  experts = register_module("experts", torch::nn::ModuleList());
  for (int64_t e = 0; e < E; ++e) {
    experts->push_back(MoEExpert(options.dim(), options.hidden_dim(), options.activation(), options.chunk()));
  }
}

void MoELayerImpl::pretty_print(std::ostream& stream) const {
  stream << "bpt::nn::MoELayer(dim=" << options.dim() << ", hidden_dim=" << options.hidden_dim()
         << ", experts=" << options.num_experts() << ", top_k=" << options.top_k()
         << ", capacity_factor=" << options.capacity_factor() << ")";
}

std::pair<at::Tensor, Routing> MoELayerImpl::forward(const at::Tensor& x) {
  const at::Tensor tokens = x.reshape({-1, options.dim()});
  const int64_t N = tokens.size(0);
  // fp32 routing whatever the model's dtype: the top-k choice is sensitive to rounding.
  const at::Tensor logits = at::linear(tokens.to(at::kFloat), gate->weight.to(at::kFloat));
  const double factor = is_training() ? options.capacity_factor() : options.eval_capacity_factor();
  Routing routing = route(logits, options.top_k(), expert_capacity(factor, options.top_k(), N, options.num_experts()));

  const at::Tensor slots = ops::moe_dispatch(tokens, routing.token);
  const at::Tensor expert_out =
      compute_experts ? compute_experts(*this, slots, routing.counts) : run_experts(slots, routing.counts);
  const at::Tensor out = ops::moe_combine(expert_out, routing.token, routing.weight, N).view(x.sizes());
  last_stats = {routing.aux_loss.item<double>(), routing.z_loss.item<double>(), routing.dropped_fraction};
  return {out, std::move(routing)};
}

at::Tensor MoELayerImpl::run_experts(const at::Tensor& rows, const std::vector<int64_t>& counts, int64_t first) {
  TORCH_CHECK(first >= 0 && first + static_cast<int64_t>(counts.size()) <= options.num_experts(),
              "MoELayer::run_experts: experts ", first, "..", first + static_cast<int64_t>(counts.size()) - 1,
              " of ", options.num_experts());
  std::vector<at::Tensor> outputs;
  int64_t offset = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    auto* expert = experts[first + static_cast<int64_t>(i)]->as<MoEExpertImpl>();
    if (counts[i] > 0) outputs.push_back(expert->forward(rows.narrow(0, offset, counts[i])));
    offset += counts[i];
  }
  TORCH_CHECK(offset == rows.size(0), "MoELayer::run_experts: ", rows.size(0), " rows, but the counts add up to ",
              offset);
  return outputs.empty() ? rows : at::cat(outputs);
}

}  // namespace bpt::nn
