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
// Every rank of the group runs each MoE layer in the same order (forward, and the recomputed
// forward and backward under FSDP), as the collectives require.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "csrc/dist/process_group.h"
#include "csrc/nn/moe.h"

namespace bpt::dist {

// The rows of `in` exchanged over `group` (Group::all_to_all), with a gradient: backward
// exchanges the output's gradient with the splits swapped.
at::Tensor all_to_all(const Group& group, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                      const std::vector<int64_t>& in_splits);

// The rank of `group` that holds expert `expert` of `num_experts`.
int64_t expert_owner(int64_t expert, int64_t num_experts, const Group& group);

// An nn::ExpertCompute placing a layer's experts across `group` as above; E must be a
// multiple of the group size.
nn::ExpertCompute expert_parallel(const Group& group);

}  // namespace bpt::dist
