#pragma once
// Expert parallelism (GShard, DeepSpeed-MoE): an MoE layer's E experts are placed across the
// P ranks of a group, L = E / P each (rank r holds experts r L ... r L + L - 1), instead of
// every rank holding all of them. Each rank routes its own tokens, then
//
//   1. tells every rank how many of its slots go to each of that rank's experts
//      (an all-to-all of the E counts),
//   2. sends the slots (all-to-all; they are already grouped by expert, so rank r's share is
//      one contiguous block) and regroups what arrives by local expert,
//   3. runs its L experts over their slices,
//   4. sends the outputs back (the reverse all-to-all) for the router-weighted combine.
//
// The all-to-alls are differentiable: backward sends the gradients back the way the rows came.
// The collectives need every rank of the group to run each MoE layer in the same order, and to
// back-propagate through every exchange it ran: whether an exchange gets a gradient function
// is decided from what every rank shares (grad mode, and whether the layer's input or
// parameters require grad), never from a rank's own rows, some of which may be empty.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "csrc/dist/process_group.h"
#include "csrc/nn/moe.h"

namespace bpt::dist {

// The rows of `in` [rows, ...] exchanged over `group` (Group::all_to_all). With `differentiable`
// (which every rank must pass alike) the output gets a gradient function, even where `in`
// needs no gradient: backward exchanges the output's gradient with the splits swapped (once:
// it is not differentiable itself). Each exchange adds the bytes it sends to *sent_bytes, if
// given (the backward's too).
at::Tensor all_to_all(const Group& group, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                      const std::vector<int64_t>& in_splits, bool differentiable,
                      std::shared_ptr<int64_t> sent_bytes = nullptr);

// The rank of `group` that holds expert `expert` of `num_experts`.
int64_t expert_owner(int64_t expert, int64_t num_experts, const Group& group);

// An nn::ExpertCompute placing a layer's experts across `group` as above; E must be a
// multiple of the group size. The exchanges' bytes add up in *sent_bytes, if given.
nn::ExpertCompute expert_parallel(const Group& group, std::shared_ptr<int64_t> sent_bytes = nullptr);

}  // namespace bpt::dist
