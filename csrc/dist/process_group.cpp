#include "csrc/dist/process_group.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef BPT_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cmath>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <vector>

#include "csrc/common/error.h"
#include "csrc/common/text.h"

namespace bpt::dist {

struct Group::Backend {
  c10::intrusive_ptr<c10d::Backend> backend;
  at::Device device = at::kCPU;  // where its collectives' tensors live (NCCL: this rank's GPU)
};

namespace {

std::optional<std::string> env(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  return std::string(value);
}

int64_t env_int(const char* name, int64_t min, int64_t max) {
  const int64_t parsed = parse_int(*env(name), fmt::format("environment variable {}", name));
  if (parsed < min || parsed > max) {
    throw_input_error("environment variable {}: expected {}..{}, got {}", name, min, max, parsed);
  }
  return parsed;
}

// Gloo's own exceptions (a peer's connection reset) reach us as they are; c10d's are c10::Errors.
[[noreturn]] void fail(const std::string& what, const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  throw CollectiveError(fmt::format("{} failed (another rank may have stopped, or the collective timed out): {}",
                                    what, c10_error ? c10_error->what_without_backtrace() : e.what()));
}

// Starts a collective with `start` and returns its Work; c10d's errors, when starting or
// waiting, become one CollectiveError naming the operation, the group and this rank.
template <typename Start>
Work collective(const Group& group, const char* op, Start&& start) {
  std::string what = fmt::format("{} over the {} group (rank {} of {})", op, group.name(), group.rank(), group.size());
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = start();
  } catch (const std::exception& e) {
    fail(what, e);
  }
  return Work([work = std::move(work), what = std::move(what)] {
    try {
      work->wait();
    } catch (const std::exception& e) {
      fail(what, e);
    }
  });
}

std::shared_ptr<::gloo::transport::Device> gloo_device(const LaunchEnv& env) {
  if (const auto interface = dist::env("GLOO_SOCKET_IFNAME")) {
    return c10d::ProcessGroupGloo::createDeviceForInterface(*interface);
  }
  if (env.master_addr == "127.0.0.1" || env.master_addr == "localhost") {
    return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
  }
  return c10d::ProcessGroupGloo::createDefaultDevice();
}

Group make_group(const c10::intrusive_ptr<c10d::Store>& store, const LaunchEnv& env, const std::string& name,
                 int64_t rank, int64_t size, std::chrono::milliseconds timeout, const std::string& device) {
  if (size == 1) return Group();
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(name + "/", store);
  auto backend = std::make_shared<Group::Backend>();
  try {
    if (device == "cuda") {
#ifdef BPT_WITH_NCCL
      backend->device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
      c10::cuda::set_device(backend->device.index());  // NCCL's communicators bind the current device
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      backend->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options);
#else
      throw_input_error("device cuda: this build of bpt has no NCCL (docs/distributed.md)");
#endif
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(gloo_device(env));
      backend->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, rank, size, options);
    }
  } catch (const InputError&) {
    throw;
  } catch (const std::exception& e) {
    fail(fmt::format("connecting the {} group (rank {} of {})", name, rank, size), e);
  }
  return Group(std::move(backend), rank, size, name);
}

}  // namespace

void Work::wait() {
  if (!wait_) return;
  auto wait = std::move(wait_);
  wait_ = nullptr;
  wait();
}

LaunchEnv launch_env() {
  LaunchEnv result;
  const bool has_rank = env("RANK").has_value(), has_world = env("WORLD_SIZE").has_value();
  if (!has_rank && !has_world) return result;
  if (!has_rank || !has_world) {
    throw_input_error("environment: {} is set but {} is not (launch with torchrun or tools/launch)",
                      has_rank ? "RANK" : "WORLD_SIZE", has_rank ? "WORLD_SIZE" : "RANK");
  }
  result.launched = true;
  result.world_size = env_int("WORLD_SIZE", 1, 1 << 20);
  result.rank = env_int("RANK", 0, result.world_size - 1);
  result.local_rank = env("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, result.world_size - 1) : result.rank;
  if (result.world_size > 1) {
    for (const char* name : {"MASTER_ADDR", "MASTER_PORT"}) {
      if (!env(name)) throw_input_error("environment: {} is not set (WORLD_SIZE is {})", name, result.world_size);
    }
    result.master_addr = *env("MASTER_ADDR");
    result.master_port = static_cast<int>(env_int("MASTER_PORT", 1, 65535));
  }
  result.agent_store = env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  return result;
}

MeshShape parse_mesh_dim(const std::string& mesh_dim, int64_t world_size) {
  const std::vector<std::string> parts = split(mesh_dim, ',');
  if (parts.size() != 3) throw_input_error("--mesh_dim: expected 'dp,fsdp,tp', got '{}'", mesh_dim);
  int64_t dims[3];
  int fill = -1;
  int64_t product = 1;
  for (int i = 0; i < 3; ++i) {
    dims[i] = parse_int(parts[i], "--mesh_dim");
    if (dims[i] == -1) {
      if (fill >= 0) throw_input_error("--mesh_dim: at most one -1, got '{}'", mesh_dim);
      fill = i;
    } else if (dims[i] < 1) {
      throw_input_error("--mesh_dim: expected sizes >= 1 or -1, got '{}'", mesh_dim);
    } else {
      product *= dims[i];
    }
  }
  if (fill >= 0) {
    if (world_size % product != 0) {
      throw_input_error("--mesh_dim '{}': {} ranks do not divide into {}", mesh_dim, world_size, product);
    }
    dims[fill] = world_size / product;
    product = world_size;
  }
  if (product != world_size) {
    throw_input_error("--mesh_dim '{}': {} ranks, but the launcher started {} (WORLD_SIZE)", mesh_dim, product,
                      world_size);
  }
  if (dims[2] > 1) {
    throw_input_error("--mesh_dim '{}': tensor parallelism (tp = {}) is not supported yet; use dp and fsdp",
                      mesh_dim, dims[2]);
  }
  return {dims[0], dims[1], dims[2]};
}

Mesh make_mesh(const LaunchEnv& env, const std::string& mesh_dim, std::chrono::milliseconds timeout,
               const std::string& device) {
  const MeshShape shape = parse_mesh_dim(mesh_dim, env.world_size);
  Mesh mesh;
  mesh.dp = shape.dp;
  mesh.fsdp = shape.fsdp;
  if (env.world_size == 1) return mesh;

  c10d::TCPStoreOptions options;
  options.port = static_cast<uint16_t>(env.master_port);
  options.isServer = env.rank == 0 && !env.agent_store;
  options.numWorkers = env.agent_store ? std::nullopt : std::optional<size_t>(env.world_size);
  options.waitWorkers = !env.agent_store;
  options.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
  } catch (const c10::Error& e) {
    const std::string where = fmt::format("{}:{}", env.master_addr, env.master_port);
    throw CollectiveError(options.isServer
                              ? fmt::format("rank 0: hosting the rendezvous store on {} failed, or not every rank "
                                            "joined in time: {}", where, e.what_without_backtrace())
                              : fmt::format("rank {}: cannot reach the rendezvous store at {}: {}", env.rank, where,
                                            e.what_without_backtrace()));
  }
  // A restarted torchrun attempt must not meet the keys of the one before (as torch does).
  if (const auto attempt = dist::env("TORCHELASTIC_RESTART_COUNT")) {
    store = c10::make_intrusive<c10d::PrefixStore>("/worker/attempt_" + *attempt, store);
  }
  const int64_t dp_index = env.rank / shape.fsdp, fsdp_index = env.rank % shape.fsdp;
  mesh.world = make_group(store, env, "world", env.rank, env.world_size, timeout, device);
  mesh.fsdp_group = shape.dp == 1 ? mesh.world
                                  : make_group(store, env, fmt::format("fsdp{}", dp_index), fsdp_index, shape.fsdp,
                                               timeout, device);
  mesh.dp_group = shape.fsdp == 1 ? mesh.world
                                  : make_group(store, env, fmt::format("dp{}", fsdp_index), dp_index, shape.dp,
                                               timeout, device);
  return mesh;
}

Work Group::all_gather(at::Tensor out, at::Tensor in) const {
  TORCH_CHECK(out.numel() == in.numel() * size_, "all_gather: output size");
  if (!backend_) {
    out.copy_(in.view_as(out));
    return Work();
  }
  return collective(*this, "all-gather", [&] { return backend_->backend->_allgather_base(out, in); });
}

Work Group::reduce_scatter(at::Tensor out, at::Tensor in) const {
  TORCH_CHECK(in.numel() == out.numel() * size_, "reduce_scatter: input size");
  if (!backend_) {
    out.copy_(in.view_as(out));
    return Work();
  }
  c10d::ReduceScatterOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  return collective(*this, "reduce-scatter",
                    [&] { return backend_->backend->_reduce_scatter_base(out, in, options); });
}

void Group::all_reduce(at::Tensor t) const {
  if (!backend_) return;
  // Small host values (token counts, norms) travel through the backend's device.
  std::vector<at::Tensor> tensors{t.device() == backend_->device ? t : t.to(backend_->device)};
  collective(*this, "all-reduce", [&] { return backend_->backend->allreduce(tensors); }).wait();
  if (!tensors[0].is_same(t)) t.copy_(tensors[0]);
}

void Group::all_to_all(at::Tensor out, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                       const std::vector<int64_t>& in_splits) const {
  const auto rows = [](const std::vector<int64_t>& splits) {
    return std::accumulate(splits.begin(), splits.end(), int64_t{0});
  };
  TORCH_CHECK(static_cast<int64_t>(out_splits.size()) == size_ && static_cast<int64_t>(in_splits.size()) == size_,
              "all_to_all: one split per rank");
  TORCH_CHECK(in.dim() >= 1 && out.dim() == in.dim() && out.sizes().slice(1) == in.sizes().slice(1) &&
                  out.scalar_type() == in.scalar_type(),
              "all_to_all: in ", in.scalar_type(), " ", in.sizes(), " and out ", out.scalar_type(), " ", out.sizes(),
              " must be rows of one dtype and shape");
  TORCH_CHECK(in.size(0) == rows(in_splits) && out.size(0) == rows(out_splits), "all_to_all: ", in.size(0),
              " rows in and ", out.size(0), " out, but the splits add up to ", rows(in_splits), " and ",
              rows(out_splits));
  if (!backend_) {
    out.copy_(in);
    return;
  }
  const at::Device device = backend_->device;
  at::Tensor send = in.to(device).contiguous();
  at::Tensor receive =
      out.device() == device && out.is_contiguous() ? out : at::empty(out.sizes(), out.options().device(device));
  std::vector<int64_t> receive_splits = out_splits, send_splits = in_splits;  // c10d takes them by reference
  collective(*this, "all-to-all",
             [&] { return backend_->backend->alltoall_base(receive, send, receive_splits, send_splits); })
      .wait();
  if (!receive.is_same(out)) out.copy_(receive);
}

std::vector<double> Group::sum(const std::vector<double>& values) const {
  if (!backend_) return values;
  at::Tensor t = at::tensor(values, at::kDouble);
  all_reduce(t);
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

bool Group::all_equal(const std::vector<double>& values) const {
  if (!backend_) return true;
  const std::vector<double> sums = sum(values);
  bool same = true;
  for (size_t i = 0; i < values.size(); ++i) {
    const double want = values[i] * static_cast<double>(size_);
    same = same && std::abs(sums[i] - want) <= 1e-9 * std::max(1.0, std::abs(want));
  }
  return sum({same ? 0.0 : 1.0})[0] == 0;  // so that every rank gives the same answer
}

std::string Group::broadcast(const std::string& text) const {
  if (!backend_) return text;
  at::Tensor length = at::full({1}, rank_ == 0 ? static_cast<int64_t>(text.size()) : 0, at::kLong);
  all_reduce(length);
  at::Tensor bytes = at::zeros({length.item<int64_t>()}, at::kInt);  // Gloo sums ints, not chars
  if (rank_ == 0) std::copy(text.begin(), text.end(), bytes.data_ptr<int32_t>());
  all_reduce(bytes);
  const int32_t* data = bytes.data_ptr<int32_t>();
  return std::string(data, data + bytes.numel());
}

void Group::barrier() const {
  if (!backend_) return;
  collective(*this, "barrier", [&] { return backend_->backend->barrier(); }).wait();
}

}  // namespace bpt::dist
