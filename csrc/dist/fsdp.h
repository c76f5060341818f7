#pragma once
// Fully sharded data parallelism for torch::nn modules, in the manner of PyTorch's FSDP:
//
// - A model's parameters are split into units (one per transformer block, and a root unit for
//   what is left: embeddings, final norm, head). Each unit's parameters are flattened into one
//   buffer, padded to a multiple of the fsdp group size; each rank keeps its 1/fsdp slice
//   (the shard) and the module's own parameter tensors are emptied.
// - run(unit, fn, inputs) all-gathers the unit (pointing the module's parameters into the
//   gathered buffer), runs fn without keeping activations, and frees the parameters again.
//   In backward it re-gathers, recomputes fn, back-propagates, and reduce-scatters the
//   gradient into the unit's gradient shard (summed over micro-batches). The next unit's
//   all-gather is started before a unit computes (forward: the one after, backward: the one
//   before), so communication overlaps compute.
// - Parameters that do not require grad (a LoRA fine-tune's frozen base) are sharded and
//   gathered alike, in a flat buffer of their own beside the unit's trainable one; they get no
//   gradient buffer, no reduce-scatter and no optimizer piece.
// - Expert parallelism (csrc/dist/expert_parallel.h): a parameter an ExpertPlacement gives to
//   fsdp rank r is held whole by that rank alone (in a flat buffer of the unit's, never
//   gathered), and left out everywhere else. Its gradient is summed over micro-batches where
//   it is, all-reduced over the dp group and averaged as the shards' are; in checkpoints it is
//   one piece in rank r's file.
// - With recompute off (remat policy everything_saveable) a unit stays gathered until
//   finish_backward(), its activations kept, as FSDP's reshard_after_forward=False.
// - The root unit is gathered on first use in a step and kept until finish_backward() (as
//   FSDP2 keeps its root: the head is the first thing backward needs).
// - finish_backward() reduce-scatters what is left, all-reduces the shards over the dp
//   group (hybrid sharding), divides by the world size (an average over data-parallel ranks)
//   and hands each piece its gradient: the optimizer then works on shards only.
//
// Gathered parameters and computation use the parameters' dtype (bf16 models gather bf16);
// gradients are reduced in that dtype, or in fp32 with fp32_reduce (the root, kept units and
// placed parameters still sum micro-batches in the parameters' dtype before their one reduce).
// The optimizer keeps fp32 masters of its pieces (csrc/train/adamw.h).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "csrc/dist/process_group.h"
#include "csrc/io/safetensors.h"
#include "csrc/io/sharded_checkpoint.h"
#include "csrc/nn/checkpoint.h"

namespace bpt::dist {

struct FsdpOptions {
  bool fp32_reduce = false;  // reduce-scatter gradients in fp32 (for bf16/fp16 parameters)
  bool prefetch = true;      // start the next unit's all-gather before computing this one
};

using NamedParameters = std::vector<std::pair<std::string, at::Tensor>>;
// The fsdp rank holding parameter `name` whole (expert parallelism), or -1: sharded.
using ExpertPlacement = std::function<int64_t(const std::string& name)>;

class Fsdp {
 public:
  // units[0] is the root. Every rank passes the same units with the same values (the same
  // seed, or loaded weights: checked, it fails otherwise); each keeps its shard and empties
  // the module's tensors. The shards stay on the parameters' device. Parameters `placement`
  // gives a rank are kept whole by that rank and emptied on the others.
  Fsdp(const Mesh& mesh, std::vector<NamedParameters> units, FsdpOptions options = {},
       const ExpertPlacement& placement = {});
  ~Fsdp();
  Fsdp(const Fsdp&) = delete;
  Fsdp& operator=(const Fsdp&) = delete;

  // fn(inputs) with unit `index` (>= 1) gathered, as described above. Under grad mode with
  // no input that requires grad, the unit is kept gathered, as with recompute off.
  std::vector<at::Tensor> run(size_t index, const nn::TensorFn& fn, const std::vector<at::Tensor>& inputs,
                              bool recompute = true);
  // Gathers the root unit, if not already.
  void gather_root();
  // After the last backward of a step: gradients reduced and averaged, set on pieces().
  void finish_backward();
  // Frees every gathered unit (after a forward without backward, such as evaluation).
  void release();

  // This rank's part of each trainable parameter (requires_grad: frozen ones, such as a LoRA
  // base, are sharded too but never updated): (name, 1-D view into the shard), for the
  // optimizer. Parameters with no element on this rank are left out.
  const NamedParameters& pieces() const { return pieces_; }
  // Each parameter's whole shape, by name (those held by other ranks too).
  std::map<std::string, std::vector<int64_t>> shapes() const;
  // `local` summed over the fsdp group (squared gradient norms of the pieces).
  double sum_over_shards(double local) const;
  // Bytes of the shards and gradient shards this rank holds (padding included).
  int64_t held_bytes() const;
  // Bytes of the buffers this rank has handed to collectives so far: whole gathered and
  // reduce-scatter buffers, and the gradient shards all-reduced across replicas.
  int64_t communicated_bytes() const { return communicated_bytes_; }

  // Checkpoints (csrc/io/sharded_checkpoint.h). Writes this rank's pieces of `tensors`
  // (named "<parameter>" or "<parameter>.<suffix>", as pieces() or the optimizer name them)
  // into dir/<kind>-rank-r-of-n.safetensors; only the first replica (dp index 0) writes.
  void write_pieces(const std::string& dir, const std::string& kind, const io::NamedTensors& tensors) const;
  // Rank 0 writes dir/shards.json describing the pieces of every parameter (of the trainable
  // ones only when no "model" files are written: the optimizer's state has no frozen pieces).
  void write_index(const std::string& dir, const std::vector<std::string>& kinds) const;
  // Every trainable parameter whole, gathered from the shards: a collective, every rank of
  // the fsdp group calls it. For saving what is small, such as LoRA adapters (none may be
  // placed on one rank).
  io::NamedTensors gather_trainable();
  // Copies this rank's piece of `whole` (the whole tensor named `name`, or "<name>.<suffix>")
  // into the shard (nothing for a parameter another rank holds); false if no parameter has
  // that name.
  bool assign(const std::string& name, const at::Tensor& whole);
  // This rank's piece of the whole tensor `whole` of parameter `name` (or "<name>.<suffix>").
  at::Tensor piece_of(const std::string& name, const at::Tensor& whole) const;

  const Mesh& mesh() const { return mesh_; }

 private:
  struct Entry;
  struct Unit;
  // Flattens `parameters` into a unit and keeps this rank's shard; appends its checksums.
  // A placed unit: this rank's placed parameters whole, nothing appended.
  std::unique_ptr<Unit> make_unit(NamedParameters& parameters, bool trainable, bool placed,
                                  std::vector<double>& checksums);
  void start_gather(Unit& unit);
  void wait_gathered(Unit& unit);
  void free(Unit& unit);
  at::ScalarType reduce_dtype(const Unit& unit) const;
  void attach_grads(Unit& unit);
  void start_reduce(Unit& unit);
  void finish_reduce(Unit& unit);
  // The entry of parameter `name`, or of the parameter "<name>.<suffix>" belongs to; null if none.
  const Entry* find(const std::string& name) const;
  // Whether `name` (or "<name>.<suffix>") is a placed parameter, this rank's or another's.
  bool is_placed(const std::string& name) const;

  Mesh mesh_;
  FsdpOptions options_;
  std::vector<std::unique_ptr<Unit>> units_;
  // The units of each unit index run() and the callers know: the trainable parameters' unit,
  // and the frozen parameters' if there are any.
  std::vector<std::vector<Unit*>> groups_;
  NamedParameters pieces_;
  std::map<std::string, const Entry*> by_name_;
  // Every placed parameter (this rank's too), as the checkpoint index lists it, and whether it trains.
  std::vector<std::pair<io::ShardedTensor, bool>> placed_;
  std::set<std::string> placed_names_;
  int64_t communicated_bytes_ = 0;
};

}  // namespace bpt::dist
