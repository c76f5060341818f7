#pragma once
// A mixture-of-experts feed-forward layer (GShard / GLaM, Mixtral): a router picks the top-k
// of E expert MLPs for each token, the tokens are gathered expert by expert (bpt::moe_dispatch),
// each expert runs once over its contiguous tokens, and the outputs are summed back per token
// with the router's weights (bpt::moe_combine).
//
//   router:   logits = x W_gate^T in fp32, p = softmax(logits), the top-k experts of p, their
//             weights renormalised to sum to 1 for k > 1 (Mixtral's and GShard's top-2
//             gating); p itself for k = 1 (Switch)
//   capacity: with capacity_factor c > 0, an expert takes at most ceil(c k N / E) of the N
//             tokens' k N slots, first choices first (GShard), in token order within a choice;
//             a slot over capacity is dropped, and a token whose every slot is dropped passes
//             through on the residual. capacity_factor 0: dropless (every slot computed).
//             Which slots drop depends on the whole batch (later tokens too), as in GShard:
//             inference is dropless by default (eval_capacity_factor 0), so cached decoding
//             computes what a full forward does.
//   losses:   aux = E sum_e f_e P_e (Switch/Mixtral load balancing: f_e the fraction of the
//             N tokens with e among their top k, P_e the mean router probability of e), and
//             z = mean over tokens of logsumexp(logits)^2 (ST-MoE's router z-loss).
//
// Names follow Hugging Face's Mixtral checkpoints: gate.weight [E, C], experts.{e}.w1.weight
// [I, C] (gate), w3 [I, C] (up), w2 [C, I] (down); GELU experts have w1 and w2 only.

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <string>
#include <vector>

namespace bpt::nn {

struct MoEOptions {
  MoEOptions(int64_t dim, int64_t hidden_dim, int64_t num_experts)
      : dim_(dim), hidden_dim_(hidden_dim), num_experts_(num_experts) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, hidden_dim);  // of each expert
  TORCH_ARG(int64_t, num_experts);
  TORCH_ARG(int64_t, top_k) = 2;
  // Slots per expert in training, as a multiple of the even share k N / E; 0: dropless.
  TORCH_ARG(double, capacity_factor) = 2.0;
  TORCH_ARG(double, eval_capacity_factor) = 0.0;  // the same, in eval mode
  TORCH_ARG(std::string, activation) = "silu";    // silu (SwiGLU experts) or gelu (two-matrix experts)
  // Rows per chunk inside each expert's MLP (the blockwise FFN's chunk: each chunk's hidden
  // activations are recomputed in backward); -1: none.
  TORCH_ARG(int64_t, chunk) = -1;
};

// Which expert slots a batch of tokens gets.
struct Routing {
  at::Tensor token;   // [M] int64: the token of each kept slot, slots grouped by expert
  at::Tensor weight;  // [M] fp32: its router weight (differentiable in the router logits)
  std::vector<int64_t> counts;  // [E]: kept slots per expert, in order
  at::Tensor aux_loss, z_loss;  // fp32 scalars, differentiable
  double dropped_fraction = 0;  // of the k N slots
};

// Routes N tokens by their router logits [N, E] (fp32): top_k experts each, at most `capacity`
// slots per expert (-1: no limit), as described above.
Routing route(const at::Tensor& logits, int64_t top_k, int64_t capacity);

// Slots per expert for N tokens: ceil(factor k N / E); -1 (no limit) for factor 0.
int64_t expert_capacity(double factor, int64_t top_k, int64_t tokens, int64_t num_experts);

class MoEExpertImpl : public torch::nn::Cloneable<MoEExpertImpl> {
 public:
  MoEExpertImpl(int64_t dim, int64_t hidden_dim, std::string activation, int64_t chunk);
  void reset() override;
  // x [tokens, dim] -> [tokens, dim]: w2(silu(w1 x) * w3 x), or w2(gelu(w1 x)); chunked over
  // tokens (MoEOptions::chunk).
  at::Tensor forward(const at::Tensor& x);

  int64_t dim, hidden_dim;
  std::string activation;
  int64_t chunk;
  torch::nn::Linear w1{nullptr}, w2{nullptr}, w3{nullptr};  // w3 null for gelu
};
TORCH_MODULE(MoEExpert);

// What the last forward's router did, for the training metrics.
struct RouterStats {
  double aux_loss = 0, z_loss = 0, dropped_fraction = 0;
};

class MoELayerImpl;
// Computes a layer's experts over the dispatched slots ([M, dim], grouped by expert, counts[e]
// rows for expert e of all E) and returns their outputs in the same order. The default runs
// every expert here (MoELayerImpl::run_experts); expert parallelism
// (csrc/dist/expert_parallel.h) exchanges the slots with the ranks holding the experts.
using ExpertCompute =
    std::function<at::Tensor(MoELayerImpl& layer, const at::Tensor& slots, const std::vector<int64_t>& counts)>;

class MoELayerImpl : public torch::nn::Cloneable<MoELayerImpl> {
 public:
  explicit MoELayerImpl(const MoEOptions& options_);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  // x [..., dim] -> (out [..., dim], routing with its losses). The caller weights and adds the
  // losses (the model's router_aux_loss_coef and router_z_loss_coef).
  std::pair<at::Tensor, Routing> forward(const at::Tensor& x);
  // Experts first, first + 1, ... over `rows` grouped by expert (counts[i] rows for expert
  // first + i), each over its contiguous slice, outputs in the same order.
  at::Tensor run_experts(const at::Tensor& rows, const std::vector<int64_t>& counts, int64_t first = 0);

  MoEOptions options;
  ExpertCompute compute_experts;  // unset: run_experts over all E here
  torch::nn::Linear gate{nullptr};
  torch::nn::ModuleList experts{nullptr};
  RouterStats last_stats;
};
TORCH_MODULE(MoELayer);

}  // namespace bpt::nn
