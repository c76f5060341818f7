#include "csrc/dist/fsdp.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <filesystem>

#include "csrc/common/error.h"
#include "csrc/io/sharded_checkpoint.h"

namespace bpt::dist {

// A parameter inside its unit's flat buffer, and the part of it in this rank's shard.
struct Fsdp::Entry {
  std::string name;
  at::Tensor param;  // the module's tensor: empty, or a view into the gathered buffer
  std::vector<int64_t> shape;
  int64_t offset = 0, numel = 0;  // in the flat buffer
  int64_t begin = 0, end = 0;     // [begin, end): the flat positions of this parameter that this rank's shard holds
  size_t unit = 0;
};

struct Fsdp::Unit {
  std::vector<Entry> entries;
  at::ScalarType dtype = at::kFloat;
  int64_t padded = 0, shard_numel = 0, shard_offset = 0;
  at::Tensor shard;       // [shard_numel], this rank's slice of the flat buffer
  at::Tensor grad_shard;  // [shard_numel], summed gradients; undefined until one arrives
  at::Tensor gathered;    // [padded] while gathered or being gathered
  Work gather;
  bool gathering = false, is_gathered = false;
  bool kept_for_backward = false;  // stays gathered until finish_backward (root, activations kept)
  bool trainable = true;           // false: frozen parameters, no gradients
  bool placed = false;  // this rank's placed parameters, whole: never gathered or reduce-scattered
  at::Tensor grad_flat;  // [padded]: the parameters' .grad are views into it while it is set
  at::Tensor reduce_in, reduce_out;
  Work reduce;
  bool reducing = false;
};

Fsdp::Fsdp(const Mesh& mesh, std::vector<NamedParameters> units, FsdpOptions options,
           const ExpertPlacement& placement)
    : mesh_(mesh), options_(options) {
  at::NoGradGuard no_grad;
  std::vector<double> checksums;
  for (auto& parameters : units) {
    // Frozen parameters (requires_grad false: a LoRA base) get a flat buffer of their own,
    // gathered with the trainable one but never given gradients or reduced. So do this
    // rank's placed parameters, trainable and frozen; other ranks' are let go.
    NamedParameters frozen, trainable, placed_frozen, placed_trainable;
    for (auto& item : parameters) {
      const int64_t owner = placement ? placement(item.first) : -1;
      const bool trains = item.second.requires_grad();
      if (owner < 0) {
        (trains ? trainable : frozen).push_back(std::move(item));
        continue;
      }
      TORCH_CHECK(owner < mesh_.fsdp_group.size(), "Fsdp: ", item.first, " placed on rank ", owner, " of ",
                  mesh_.fsdp_group.size());
      const at::Tensor& param = item.second;
      checksums.push_back(param.sum().item<double>());  // every rank holds it whole here
      checksums.push_back(param.abs().sum().item<double>());
      placed_.push_back({{item.first, param.sizes().vec(), {{owner, 0, param.numel()}}}, trains});
      placed_names_.insert(item.first);
      if (owner == mesh_.fsdp_group.rank()) {
        (trains ? placed_trainable : placed_frozen).push_back(std::move(item));
      } else {
        item.second.set_data(at::empty({0}, param.options()));
      }
    }
    std::vector<Unit*> group;
    for (auto* part : {&trainable, &frozen, &placed_trainable, &placed_frozen}) {
      // Empty parts are left out, but every index keeps one unit, if empty, for run() to find.
      if (part->empty() && !(part == &frozen && group.empty())) continue;
      const bool placed = part == &placed_trainable || part == &placed_frozen;
      units_.push_back(make_unit(*part, part == &trainable || part == &placed_trainable, placed, checksums));
      group.push_back(units_.back().get());
    }
    groups_.push_back(std::move(group));
  }
  // Shards of different weights would train a model no rank holds: refuse that at once.
  TORCH_CHECK(mesh_.world.all_equal(checksums),
              "Fsdp: the ranks hold different weights (seed each rank alike, or load the same checkpoint)");
  for (size_t u = 0; u < units_.size(); ++u) {
    Unit& unit = *units_[u];
    for (Entry& entry : unit.entries) {
      entry.unit = u;
      by_name_[entry.name] = &entry;
      if (unit.trainable && entry.end > entry.begin) {
        pieces_.emplace_back(entry.name, unit.shard.narrow(0, entry.begin - unit.shard_offset, entry.end - entry.begin));
      }
    }
  }
}

std::unique_ptr<Fsdp::Unit> Fsdp::make_unit(NamedParameters& parameters, bool trainable, bool placed,
                                             std::vector<double>& checksums) {
  // A placed unit is a "shard" of a group of one: the whole buffer, here.
  const int64_t ranks = placed ? 1 : mesh_.fsdp_group.size(), rank = placed ? 0 : mesh_.fsdp_group.rank();
  auto unit = std::make_unique<Unit>();
  unit->trainable = trainable;
  unit->placed = placed;
  int64_t total = 0;
  at::TensorOptions options = at::TensorOptions().dtype(at::kFloat);
  for (auto& [name, param] : parameters) {
    TORCH_CHECK(unit->entries.empty() || param.scalar_type() == unit->dtype, "Fsdp: a unit mixes dtypes (", name, ")");
    unit->dtype = param.scalar_type();
    options = param.options();
    Entry entry;
    entry.name = name;
    entry.param = param;
    entry.shape = param.sizes().vec();
    entry.offset = total;
    entry.numel = param.numel();
    total += entry.numel;
    unit->entries.push_back(std::move(entry));
  }
  unit->shard_numel = (total + ranks - 1) / ranks;
  unit->padded = unit->shard_numel * ranks;
  unit->shard_offset = rank * unit->shard_numel;
  at::Tensor flat = at::zeros({unit->padded}, options);
  for (Entry& entry : unit->entries) {
    flat.narrow(0, entry.offset, entry.numel).copy_(entry.param.detach().reshape({-1}));
    entry.begin = std::clamp(unit->shard_offset, entry.offset, entry.offset + entry.numel);
    entry.end = std::clamp(unit->shard_offset + unit->shard_numel, entry.offset, entry.offset + entry.numel);
    entry.param.set_data(at::empty({0}, flat.options()));
  }
  if (placed) {  // the parameters live in the buffer for good
    unit->shard = flat;
    unit->is_gathered = true;
    for (Entry& entry : unit->entries) {
      entry.param.set_data(flat.narrow(0, entry.offset, entry.numel).view(entry.shape));
    }
    return unit;
  }
  unit->shard = flat.narrow(0, unit->shard_offset, unit->shard_numel).clone();
  checksums.push_back(flat.sum().item<double>());
  checksums.push_back(flat.abs().sum().item<double>());
  return unit;
}

Fsdp::~Fsdp() = default;

void Fsdp::start_gather(Unit& unit) {
  if (unit.gathering || unit.is_gathered) return;
  unit.gathered = at::empty({unit.padded}, unit.shard.options());
  unit.gather = mesh_.fsdp_group.all_gather(unit.gathered, unit.shard);
  if (mesh_.fsdp_group.size() > 1) communicated_bytes_ += unit.gathered.nbytes();
  unit.gathering = true;
}

void Fsdp::wait_gathered(Unit& unit) {
  if (unit.is_gathered) return;
  start_gather(unit);
  unit.gather.wait();
  for (Entry& entry : unit.entries) {
    entry.param.set_data(unit.gathered.narrow(0, entry.offset, entry.numel).view(entry.shape));
  }
  unit.gathering = false;
  unit.is_gathered = true;
}

void Fsdp::free(Unit& unit) {
  if (!unit.is_gathered || unit.placed) return;
  if (unit.grad_flat.defined()) {  // gathered for a backward that never came (start_reduce takes it otherwise)
    for (Entry& entry : unit.entries) entry.param.mutable_grad() = at::Tensor();
    unit.grad_flat = at::Tensor();
  }
  for (Entry& entry : unit.entries) entry.param.set_data(at::empty({0}, unit.shard.options()));
  unit.gathered = at::Tensor();
  unit.is_gathered = false;
  unit.kept_for_backward = false;
}

at::ScalarType Fsdp::reduce_dtype(const Unit& unit) const { return options_.fp32_reduce ? at::kFloat : unit.dtype; }

void Fsdp::attach_grads(Unit& unit) {
  // Autograd adds into a parameter's existing .grad in place, so gradients land in the flat
  // buffer the reduce-scatter sends, with no copy. (An fp32 reduce of bf16 parameters copies.)
  // A placed unit's gradient is summed in place over the micro-batches until finish_backward.
  // (The recomputing path calls this with grad mode off: finish_backward then takes .grad.)
  if (!unit.trainable || unit.grad_flat.defined() || !at::GradMode::is_enabled() ||
      (reduce_dtype(unit) != unit.dtype && !unit.placed)) {
    return;
  }
  unit.grad_flat = at::zeros({unit.padded}, unit.shard.options());
  for (Entry& entry : unit.entries) {
    entry.param.mutable_grad() = unit.grad_flat.narrow(0, entry.offset, entry.numel).view(entry.shape);
  }
}

void Fsdp::start_reduce(Unit& unit) {
  if (!unit.trainable || unit.placed) return;
  // At most one other reduce in flight: each holds a whole unit's gradients.
  for (auto& other : units_) {
    if (other.get() != &unit) finish_reduce(*other);
  }
  if (unit.grad_flat.defined()) {
    unit.reduce_in = std::move(unit.grad_flat);
    unit.grad_flat = at::Tensor();
  } else {
    unit.reduce_in = at::zeros({unit.padded}, unit.shard.options().dtype(reduce_dtype(unit)));
  }
  for (Entry& entry : unit.entries) {
    at::Tensor& grad = entry.param.mutable_grad();
    if (!grad.defined()) continue;
    if (!grad.is_alias_of(unit.reduce_in)) unit.reduce_in.narrow(0, entry.offset, entry.numel).copy_(grad.reshape({-1}));
    grad = at::Tensor();
  }
  unit.reduce_out = at::empty({unit.shard_numel}, unit.reduce_in.options());
  unit.reduce = mesh_.fsdp_group.reduce_scatter(unit.reduce_out, unit.reduce_in);
  if (mesh_.fsdp_group.size() > 1) communicated_bytes_ += unit.reduce_in.nbytes();
  unit.reducing = true;
}

void Fsdp::finish_reduce(Unit& unit) {
  if (!unit.reducing) return;
  unit.reduce.wait();
  if (unit.grad_shard.defined()) {
    unit.grad_shard.add_(unit.reduce_out);
  } else {
    unit.grad_shard = unit.reduce_out;
  }
  unit.reduce_in = unit.reduce_out = at::Tensor();
  unit.reducing = false;
}

std::vector<at::Tensor> Fsdp::run(size_t index, const nn::TensorFn& fn, const std::vector<at::Tensor>& inputs,
                                  bool recompute) {
  TORCH_CHECK(index >= 1 && index < groups_.size(), "Fsdp::run: no unit ", index);
  const std::vector<Unit*>& group = groups_[index];
  const auto each = [&group](const std::function<void(Unit&)>& action) {
    for (Unit* unit : group) action(*unit);
  };
  const auto gather_this_and_prefetch = [this, &group](int64_t next) {
    for (Unit* unit : group) wait_gathered(*unit);
    if (!options_.prefetch || next < 1 || next >= static_cast<int64_t>(groups_.size())) return;
    for (Unit* unit : groups_[next]) start_gather(*unit);
  };
  // Without recomputation, or when no input needs a gradient (say, a frozen embedding) and
  // backward reaches the parameters only through the graph fn builds, the unit stays gathered.
  const bool any_input_grad =
      std::any_of(inputs.begin(), inputs.end(), [](const at::Tensor& t) { return t.requires_grad(); });
  if (at::GradMode::is_enabled() && (!recompute || !any_input_grad)) {
    gather_this_and_prefetch(static_cast<int64_t>(index) + 1);
    each([this](Unit& unit) {
      attach_grads(unit);
      unit.kept_for_backward = true;
    });
    return fn(inputs);
  }
  nn::CheckpointHooks hooks;
  hooks.before_forward = [gather_this_and_prefetch, index] {
    gather_this_and_prefetch(static_cast<int64_t>(index) + 1);
  };
  hooks.after_forward = [this, each] { each([this](Unit& unit) { free(unit); }); };
  hooks.before_recompute = [this, gather_this_and_prefetch, index, each] {
    gather_this_and_prefetch(static_cast<int64_t>(index) - 1);
    each([this](Unit& unit) { attach_grads(unit); });
  };
  hooks.after_backward = [this, each] {
    each([this](Unit& unit) {
      start_reduce(unit);
      free(unit);
    });
  };
  return nn::checkpoint(fn, inputs, hooks);
}

void Fsdp::gather_root() {
  for (Unit* unit : groups_[0]) {
    wait_gathered(*unit);
    attach_grads(*unit);
    unit->kept_for_backward = true;
  }
}

void Fsdp::finish_backward() {
  at::NoGradGuard no_grad;
  for (auto& unit : units_) {
    if (!unit->kept_for_backward) continue;
    start_reduce(*unit);
    free(*unit);
  }
  for (auto& unit : units_) finish_reduce(*unit);
  for (auto& unit : units_) {
    // A placed unit's gradients were summed where they are: in its flat buffer, or (when
    // backward recomputed the layer, with grad mode off) in the parameters' own .grad. Every
    // replica gets one, zeros if no token reached its experts, for the all-reduce below.
    if (!unit->placed || !unit->trainable) continue;
    // (Summed over micro-batches in the parameters' dtype, as the root's are; reduced in reduce_dtype.)
    unit->grad_shard = unit->grad_flat.defined() ? std::move(unit->grad_flat) : at::zeros_like(unit->shard);
    unit->grad_flat = at::Tensor();
    for (Entry& entry : unit->entries) {
      at::Tensor& grad = entry.param.mutable_grad();
      if (grad.defined() && !grad.is_alias_of(unit->grad_shard)) {
        unit->grad_shard.narrow(0, entry.offset, entry.numel).add_(grad.reshape({-1}));
      }
      grad = at::Tensor();
    }
    unit->grad_shard = unit->grad_shard.to(reduce_dtype(*unit));
  }
  const double world = static_cast<double>(mesh_.world_size());
  for (auto& unit : units_) {
    if (!unit->grad_shard.defined()) continue;  // no gradient reached this unit
    if (mesh_.dp > 1) {
      mesh_.dp_group.all_reduce(unit->grad_shard);
      communicated_bytes_ += unit->grad_shard.nbytes();
    }
    if (world > 1) unit->grad_shard.div_(world);
  }
  for (auto& [name, piece] : pieces_) {
    const Entry& entry = *by_name_.at(name);
    const Unit& unit = *units_[entry.unit];
    if (!unit.grad_shard.defined()) continue;
    piece.mutable_grad() = unit.grad_shard.narrow(0, entry.begin - unit.shard_offset, entry.end - entry.begin);
  }
  for (auto& unit : units_) unit->grad_shard = at::Tensor();  // the pieces' grads hold it until the update
}

void Fsdp::release() {
  for (auto& unit : units_) {
    if (unit->gathering) wait_gathered(*unit);
    free(*unit);
  }
}

std::map<std::string, std::vector<int64_t>> Fsdp::shapes() const {
  std::map<std::string, std::vector<int64_t>> result;
  for (const auto& [name, entry] : by_name_) result[name] = entry->shape;
  for (const auto& [tensor, trains] : placed_) result[tensor.name] = tensor.shape;
  return result;
}

double Fsdp::sum_over_shards(double local) const {
  return mesh_.fsdp_group.sum({local})[0];
}

int64_t Fsdp::held_bytes() const {
  int64_t bytes = 0;
  for (const auto& unit : units_) {
    const int64_t grad_size = options_.fp32_reduce ? 4 : static_cast<int64_t>(c10::elementSize(unit->dtype));
    bytes += unit->shard.nbytes() + (unit->trainable ? unit->shard_numel * grad_size : 0);
  }
  return bytes;
}

namespace {

// `name` in `names` (a map or set by parameter name), or else the parameter "<name>.<suffix>"
// belongs to (an optimizer state, "<parameter>.exp_avg").
template <typename Names>
auto find_parameter(const Names& names, const std::string& name) {
  auto it = names.find(name);
  const size_t dot = name.rfind('.');
  if (it == names.end() && dot != std::string::npos) it = names.find(name.substr(0, dot));
  return it;
}

}  // namespace

const Fsdp::Entry* Fsdp::find(const std::string& name) const {
  const auto it = find_parameter(by_name_, name);
  return it == by_name_.end() ? nullptr : it->second;
}

io::NamedTensors Fsdp::gather_trainable() {
  io::NamedTensors result;
  for (const auto& unit : units_) {
    if (!unit->trainable || unit->entries.empty()) continue;
    TORCH_CHECK(!unit->placed, "Fsdp::gather_trainable: ", unit->entries[0].name, " is placed on one rank");
    at::Tensor flat = at::empty({unit->padded}, unit->shard.options());
    mesh_.fsdp_group.all_gather(flat, unit->shard).wait();
    for (const Entry& entry : unit->entries) {
      result.emplace_back(entry.name, flat.narrow(0, entry.offset, entry.numel).view(entry.shape));
    }
  }
  return result;
}

bool Fsdp::assign(const std::string& name, const at::Tensor& whole) {
  const Entry* entry = find(name);
  if (entry == nullptr) return is_placed(name);
  if (entry->end == entry->begin) return true;  // no element of it on this rank
  at::NoGradGuard no_grad;
  const Unit& unit = *units_[entry->unit];
  unit.shard.narrow(0, entry->begin - unit.shard_offset, entry->end - entry->begin).copy_(piece_of(name, whole));
  return true;
}

bool Fsdp::is_placed(const std::string& name) const {
  return find_parameter(placed_names_, name) != placed_names_.end();
}

at::Tensor Fsdp::piece_of(const std::string& name, const at::Tensor& whole) const {
  const Entry* entry = find(name);
  if (entry == nullptr && is_placed(name)) return whole.reshape({-1}).narrow(0, 0, 0);  // no element here
  if (entry == nullptr) return whole;
  if (whole.numel() != entry->numel) {
    throw_input_error("'{}': {} elements, expected {} (shape {})", name, whole.numel(), entry->numel,
                      io::shape_string(entry->shape));
  }
  return whole.reshape({-1}).narrow(0, entry->begin - entry->offset, entry->end - entry->begin);
}

void Fsdp::write_pieces(const std::string& dir, const std::string& kind, const io::NamedTensors& tensors) const {
  if (mesh_.dp_group.rank() != 0) return;  // the other replicas hold the same shards
  const std::string path =
      (std::filesystem::path(dir) / io::shard_file_name(kind, mesh_.fsdp_group.rank(), mesh_.fsdp_group.size()))
          .string();
  io::save_safetensors(path, tensors);
}

void Fsdp::write_index(const std::string& dir, const std::vector<std::string>& kinds) const {
  if (mesh_.rank() != 0) return;
  const bool weights = std::find(kinds.begin(), kinds.end(), "model") != kinds.end();
  std::vector<io::ShardedTensor> tensors;
  for (const auto& [tensor, trains] : placed_) {
    if (weights || trains) tensors.push_back(tensor);
  }
  for (const auto& unit : units_) {
    if ((!weights && !unit->trainable) || unit->placed) continue;
    for (const Entry& entry : unit->entries) {
      io::ShardedTensor tensor{entry.name, entry.shape, {}};
      for (int64_t r = 0; r < mesh_.fsdp_group.size(); ++r) {
        const int64_t lo = std::max(r * unit->shard_numel, entry.offset);
        const int64_t hi = std::min((r + 1) * unit->shard_numel, entry.offset + entry.numel);
        if (hi > lo) tensor.pieces.push_back({r, lo - entry.offset, hi - lo});
      }
      tensors.push_back(std::move(tensor));
    }
  }
  io::write_shard_index(dir, mesh_.fsdp_group.size(), tensors, kinds);
}

}  // namespace bpt::dist
