#include "csrc/dist/expert_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>

namespace bpt::dist {
namespace {

at::Tensor exchange(const Group& group, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                    const std::vector<int64_t>& in_splits, int64_t* sent_bytes) {
  std::vector<int64_t> shape = in.sizes().vec();
  shape[0] = std::accumulate(out_splits.begin(), out_splits.end(), int64_t{0});
  at::Tensor out = at::empty(shape, in.options());
  group.all_to_all(out, in.contiguous(), out_splits, in_splits);
  if (sent_bytes != nullptr && group.size() > 1) *sent_bytes += in.nbytes();
  return out;
}

// The gradient of all_to_all: the output's gradient goes back to the ranks its rows came from.
struct AllToAllBackward : torch::autograd::Node {
  AllToAllBackward(Group group_, std::vector<int64_t> out_splits_, std::vector<int64_t> in_splits_,
                   std::shared_ptr<int64_t> sent_bytes_)
      : group(std::move(group_)),
        out_splits(std::move(out_splits_)),
        in_splits(std::move(in_splits_)),
        sent_bytes(std::move(sent_bytes_)) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(!at::GradMode::is_enabled(), "bpt::dist::all_to_all: no double backward");
    // Every rank takes part, with zeros (the output's shape) if nothing reached this output.
    const at::Tensor grad = grads[0].defined() ? grads[0] : input_metadata(0).zeros_like();
    return {exchange(group, grad, in_splits, out_splits, sent_bytes.get())};
  }
  std::string name() const override { return "bpt::dist::AllToAllBackward"; }

  Group group;
  std::vector<int64_t> out_splits, in_splits;
  std::shared_ptr<int64_t> sent_bytes;
};

// Autograd holds nodes in c10::intrusive_ptr in the torch bpt builds against here, in
// std::shared_ptr in older releases (the GPU machine's torch may be one).
template <typename NodeType, typename... Args>
auto make_node(Args&&... args) {
  using Pointer = decltype(torch::autograd::Edge::function);
  if constexpr (std::is_same_v<Pointer, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<NodeType>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<NodeType>(std::forward<Args>(args)...);
  }
}

}  // namespace

at::Tensor all_to_all(const Group& group, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                      const std::vector<int64_t>& in_splits, bool differentiable, std::shared_ptr<int64_t> sent_bytes) {
  TORCH_CHECK(in.dim() >= 1, "all_to_all: expected rows [n, ...], got a scalar");
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = exchange(group, in.detach(), out_splits, in_splits, sent_bytes.get());
  }
  if (differentiable && at::GradMode::is_enabled()) {
    auto node = make_node<AllToAllBackward>(group, out_splits, in_splits, std::move(sent_bytes));
    node->set_next_edges(torch::autograd::collect_next_edges(in));
    torch::autograd::set_history(out, node);
  }
  return out;
}

int64_t expert_owner(int64_t expert, int64_t num_experts, const Group& group) {
  return expert / (num_experts / group.size());
}

nn::ExpertCompute expert_parallel(const Group& group, std::shared_ptr<int64_t> sent_bytes) {
  return [group, sent_bytes](nn::MoELayerImpl& layer, const at::Tensor& slots, const std::vector<int64_t>& counts) {
    const auto P = group.size(), E = static_cast<int64_t>(counts.size());
    TORCH_CHECK(E % P == 0, "expert parallelism: ", E, " experts do not divide over ", P, " ranks");
    const int64_t L = E / P;
    // Alike on every rank: the same model, the same grad mode.
    bool differentiable = slots.requires_grad();
    for (const at::Tensor& parameter : layer.parameters()) differentiable = differentiable || parameter.requires_grad();
    // 1. The slot counts: counts[r L + l] slots of ours go to rank r's expert l; we get
    //    got[r L + l] of rank r's for our expert l.
    const at::Tensor send_counts = at::tensor(counts, at::kLong);
    at::Tensor receive_counts = at::empty_like(send_counts);
    const std::vector<int64_t> per_rank(static_cast<size_t>(P), L);
    group.all_to_all(receive_counts, send_counts, per_rank, per_rank);
    const int64_t* got = receive_counts.data_ptr<int64_t>();
    std::vector<int64_t> send_splits(static_cast<size_t>(P), 0), receive_splits(static_cast<size_t>(P), 0);
    std::vector<int64_t> local_counts(static_cast<size_t>(L), 0);
    for (int64_t r = 0; r < P; ++r) {
      for (int64_t l = 0; l < L; ++l) {
        send_splits[r] += counts[r * L + l];
        receive_splits[r] += got[r * L + l];
        local_counts[l] += got[r * L + l];
      }
    }
    // 2. The slots, arriving rank by rank (each rank's grouped by our experts); regrouped
    //    expert by expert.
    const at::Tensor arrived = all_to_all(group, slots, receive_splits, send_splits, differentiable, sent_bytes);
    std::vector<int64_t> start(static_cast<size_t>(P * L));  // where rank r's rows for expert l begin
    std::exclusive_scan(got, got + P * L, start.begin(), int64_t{0});
    std::vector<int64_t> order;  // by expert: the arrived row of each
    order.reserve(static_cast<size_t>(arrived.size(0)));
    for (int64_t l = 0; l < L; ++l) {
      for (int64_t r = 0; r < P; ++r) {
        for (int64_t i = 0; i < got[r * L + l]; ++i) order.push_back(start[r * L + l] + i);
      }
    }
    std::vector<int64_t> inverse(order.size());
    for (size_t j = 0; j < order.size(); ++j) inverse[static_cast<size_t>(order[j])] = static_cast<int64_t>(j);
    const auto rows = [&slots](const std::vector<int64_t>& positions) {
      return at::tensor(positions, at::kLong).to(slots.device());
    };
    // 3. Our experts over their slices; 4. the outputs back where the slots came from.
    const at::Tensor computed =
        layer.run_experts(arrived.index_select(0, rows(order)), local_counts, group.rank() * L);
    return all_to_all(group, computed.index_select(0, rows(inverse)), send_splits, receive_splits, differentiable,
                      sent_bytes);
  };
}

}  // namespace bpt::dist
