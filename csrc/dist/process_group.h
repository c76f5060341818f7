#pragma once
// Process groups from PyTorch's c10d, created from torchrun's environment: a TCPStore for
// the rendezvous, ProcessGroupGloo on CPU (ProcessGroupNCCL on CUDA in a build with NCCL).
//
//   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT    set by torchrun (or tools/launch)
//   TORCHELASTIC_USE_AGENT_STORE=True                         torchrun hosts the store itself
//   TORCHELASTIC_RESTART_COUNT                                torchrun's attempt: its store keys are apart
//   GLOO_SOCKET_IFNAME                                        the network interface, if not the default
//
// Without RANK and WORLD_SIZE the process is a world of one and no collective runs.
// --mesh_dim 'dp,fsdp,tp' (llamabpt's): replicate over dp, shard over fsdp; rank =
// dp_index * fsdp + fsdp_index, so each fsdp group is a block of consecutive ranks.
#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace bpt::dist {

// What the launcher told this process.
struct LaunchEnv {
  int64_t rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
  bool agent_store = false;  // torchrun's agent hosts the TCPStore: every rank is a client
  bool launched = false;     // RANK and WORLD_SIZE were set
};

// Reads the variables above; InputError naming the variable if one is missing, not a number
// or inconsistent (RANK >= WORLD_SIZE, ...).
LaunchEnv launch_env();

// A collective in flight. wait() returns when it is done; a failure (a rank died, the
// timeout passed) is a CollectiveError.
class Work {
 public:
  Work() = default;
  explicit Work(std::function<void()> wait) : wait_(std::move(wait)) {}
  void wait();
  bool pending() const { return static_cast<bool>(wait_); }

 private:
  std::function<void()> wait_;
};

// A collective failed: the message says which group, which operation and why.
class CollectiveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A set of processes that run collectives together. The default is a group of one, where
// every collective is a copy (or nothing).
class Group {
 public:
  Group() = default;
  struct Backend;  // the c10d backend (defined in process_group.cpp)
  Group(std::shared_ptr<Backend> backend, int64_t rank, int64_t size, std::string name)
      : backend_(std::move(backend)), rank_(rank), size_(size), name_(std::move(name)) {}
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  const std::string& name() const { return name_; }

  // out [size * n] = every rank's `in` [n], in rank order.
  Work all_gather(at::Tensor out, at::Tensor in) const;
  // out [n] = the sum over ranks of in[rank * n : (rank + 1) * n].
  Work reduce_scatter(at::Tensor out, at::Tensor in) const;
  // t = the sum over ranks of t; waits.
  void all_reduce(at::Tensor t) const;
  // Rows of `in` go to each rank in turn (in_splits[r] rows to rank r) and out receives
  // out_splits[r] rows from each rank r, in rank order; waits. Small host tensors (counts)
  // travel through the backend's device, as all_reduce's do.
  void all_to_all(at::Tensor out, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                  const std::vector<int64_t>& in_splits) const;
  void barrier() const;
  // The element-wise sum over ranks of each rank's `values` (small host numbers: counts,
  // norms); waits.
  std::vector<double> sum(const std::vector<double>& values) const;
  // Whether every rank passed the same values (up to rounding); every rank gets the answer.
  bool all_equal(const std::vector<double>& values) const;
  // Rank 0's `text`, on every rank.
  std::string broadcast(const std::string& text) const;

 private:
  std::shared_ptr<Backend> backend_;  // null: a group of one
  int64_t rank_ = 0, size_ = 1;
  std::string name_ = "self";
};

// The device mesh of a run: dp replicas of a model sharded over fsdp ranks.
struct Mesh {
  int64_t dp = 1, fsdp = 1;
  Group world;       // every rank
  Group fsdp_group;  // the ranks holding the shards of one replica
  Group dp_group;    // the ranks holding the same shard in each replica
  int64_t rank() const { return world.rank(); }
  int64_t world_size() const { return world.size(); }
  bool distributed() const { return world.size() > 1; }
};

// Parses `mesh_dim` ("dp,fsdp,tp"; one -1 takes the ranks left) against the world size.
// InputError for a bad spec, a product that is not the world size, or tp > 1.
struct MeshShape {
  int64_t dp = 1, fsdp = 1, tp = 1;
};
MeshShape parse_mesh_dim(const std::string& mesh_dim, int64_t world_size);

// Connects to the launcher's store and creates the world, fsdp and dp groups (Gloo on CPU,
// NCCL when `device` is CUDA). A world of one creates nothing.
Mesh make_mesh(const LaunchEnv& env, const std::string& mesh_dim, std::chrono::milliseconds timeout,
               const std::string& device = "cpu");

}  // namespace bpt::dist
