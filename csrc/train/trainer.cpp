#include "csrc/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <fstream>
#include <functional>
#include <map>
#include <stdexcept>

#include "csrc/common/error.h"
#include "csrc/train/checkpointer.h"
#include "csrc/train/metrics.h"

namespace bpt::train {
namespace {

std::atomic<bool> stop_requested{false};
// The first signal asks for a clean stop; a second one (the default action) ends the process.
extern "C" void request_stop(int signal_number) {
  stop_requested = true;
  std::signal(signal_number, SIG_DFL);
}

// SIGINT and SIGTERM ask the loop to stop after the current step, while fit() runs.
class StopSignals {
 public:
  StopSignals() {
    stop_requested = false;
    previous_int_ = std::signal(SIGINT, request_stop);
    previous_term_ = std::signal(SIGTERM, request_stop);
  }
  ~StopSignals() {
    std::signal(SIGINT, previous_int_);
    std::signal(SIGTERM, previous_term_);
  }

 private:
  void (*previous_int_)(int);
  void (*previous_term_)(int);
};

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// A generator's state as bytes in trainer_state.json: "rng" the CPU's default generator, and on
// a GPU run "gpu_rng" the default generator of the run's GPU (dropout on GPU tensors draws from
// it), the names nn::checkpoint gives the two when it replays a block.
nlohmann::json rng_state(const at::Generator& generator) {
  const at::Tensor state = generator.get_state();  // a CPU byte tensor
  return std::vector<uint8_t>(state.data_ptr<uint8_t>(), state.data_ptr<uint8_t>() + state.numel());
}

// Restores `field` of trainer_state.json (in dir) into generator; a value that is not its
// state (not bytes, the wrong size for its kind of generator) exits 2 naming the field.
void restore_rng(at::Generator generator, const nlohmann::json& state_json, const char* field,
                 const std::string& dir) {
  const nlohmann::json& bytes = state_json[field];
  const at::Tensor expected = generator.get_state();
  const auto fail = [&](const char* why) {
    throw_input_error("{}/trainer_state.json: field '{}' must be the {}-byte state of the {} default generator, "
                      "got {} ({})", dir, field, expected.numel(), generator.device().str(),
                      bytes.is_array() ? fmt::format("{} bytes", bytes.size()) : std::string(bytes.type_name()), why);
  };
  try {
    const auto values = bytes.get<std::vector<uint8_t>>();
    at::Tensor state = at::empty({static_cast<int64_t>(values.size())}, at::kByte);
    std::copy(values.begin(), values.end(), state.data_ptr<uint8_t>());
    generator.set_state(state);  // checks the size for its kind of generator
  } catch (const c10::Error& e) {
    fail(e.what_without_backtrace());
  } catch (const nlohmann::json::exception& e) {
    fail(e.what());
  }
}

}  // namespace

double measure_peak_flops(at::ScalarType dtype, at::Device device) {
  at::NoGradGuard no_grad;
  // A GPU needs larger products, and more of them, to reach its speed.
  const int64_t n = device.is_cpu() ? 2048 : 8192;
  const int reps = device.is_cpu() ? 3 : 20;
  // A generator of its own: the global one belongs to training (and a resumed run's state).
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(0);
  const at::Tensor a = at::randn({n, n}, generator).to(device, dtype);
  const at::Tensor b = at::randn({n, n}, generator).to(device, dtype);
  // Reading one element waits for the product (a GPU computes asynchronously).
  const auto finished = [](const at::Tensor& c) { c.select(0, 0).select(0, 0).item<double>(); };
  finished(at::mm(a, b));  // warm-up
  const auto start = Clock::now();
  at::Tensor c;
  for (int i = 0; i < reps; ++i) c = at::mm(a, b);
  finished(c);
  return 2.0 * static_cast<double>(n * n * n) * reps / seconds_since(start);
}

data::Batch slice_rows(const data::Batch& batch, int64_t rank, int64_t ranks) {
  if (ranks == 1) return batch;
  const int64_t rows = batch.input_ids.size(0);
  if (rows % ranks != 0) {
    throw_input_error("batch_size {} does not divide among {} data-parallel ranks (the batch is global: each rank "
                      "takes batch_size / ranks rows)", rows, ranks);
  }
  const int64_t per_rank = rows / ranks;
  const auto slice = [&](const at::Tensor& t) { return t.defined() ? t.narrow(0, rank * per_rank, per_rank) : t; };
  return {slice(batch.input_ids), slice(batch.targets), slice(batch.segment_ids)};
}

Trainer::Trainer(TrainerOptions options, AdamWOptions adamw, dist::Group world)
    : options_(std::move(options)), adamw_(adamw), world_(std::move(world)) {
  if (options_.total_steps < 0) throw_input_error("total_steps: expected >= 0, got {}", options_.total_steps);
  if (options_.accumulate_gradient_steps < 1) {
    throw_input_error("optimizer.adamw_optimizer.accumulate_gradient_steps: expected >= 1, got {}",
                      options_.accumulate_gradient_steps);
  }
  if (options_.log_freq < 1) throw_input_error("log_freq: expected >= 1, got {}", options_.log_freq);
  for (const auto& [name, value] : {std::pair{"save_model_freq", options_.save_model_freq},
                                    {"save_milestone_freq", options_.save_milestone_freq},
                                    {"eval_freq", options_.eval_freq}}) {
    if (value < 0) throw_input_error("{}: expected >= 0, got {}", name, value);
  }
}

FitResult Trainer::fit(TrainModule& module, data::DataLoader& train, data::DataLoader* eval) {
  const StopSignals signals;
  const Checkpointer checkpointer(options_.output_dir, options_.save_optimizer_state, options_.save_delay_ms, world_);
  MetricsLog metrics(options_.output_dir, options_.progress, options_.total_steps, world_.rank() == 0);
  const auto ranks = static_cast<double>(world_.size());

  // Weights first: the optimizer takes its fp32 masters from the parameters it is given.
  FitResult result;
  if (world_.size() > 1 && module.sharding() == nullptr) {
    throw std::invalid_argument("Trainer: a module trained on several ranks must be sharded (its sharding() set): "
                                "nothing else reduces its gradients across ranks");
  }
  std::string resume_from = options_.resume_from;
  if (options_.autoresume) {
    if (const auto latest = checkpointer.latest()) resume_from = *latest;
  }
  // Every rank must start from the same checkpoint (a filesystem that is not shared alike
  // would make them differ, and their steps with them).
  if (!world_.all_equal({static_cast<double>(std::hash<std::string>{}(resume_from) % (1 << 30))})) {
    throw_input_error("the ranks found different checkpoints to resume from (this rank: '{}'); is {} on a "
                      "filesystem every rank shares?", resume_from, options_.output_dir);
  }
  // The device the module trains on (its parameters'), and their dtype for the peak FLOP/s.
  at::Device device = at::kCPU;
  at::ScalarType dtype = at::kFloat;
  if (const auto parameters = module.named_parameters(); !parameters.empty()) {
    device = parameters.front().second.device();
    dtype = parameters.front().second.scalar_type();
  }
  nlohmann::json resumed;
  if (!resume_from.empty()) {
    resumed = Checkpointer::read_state(resume_from);
    module.load(resume_from);
  }
  AdamW optimizer(module.named_parameters(), module.configure_optimizers(adamw_), module.sharding());
  if (!resume_from.empty()) {
    result.steps = resumed["step"].get<int64_t>();
    result.skipped_steps = resumed.value("skipped_steps", int64_t{0});
    if (!module.load_optimizer(resume_from, optimizer)) {
      optimizer.restart_at(result.steps - result.skipped_steps);
      metrics.note(fmt::format("{}: no optimizer state; Adam's moments start again at zero", resume_from));
    }
    try {
      train.restore(resumed["dataset"]);
      if (resumed.contains("rng")) restore_rng(at::detail::getDefaultCPUGenerator(), resumed, "rng", resume_from);
      // A checkpoint without gpu_rng (a CPU run's, or an older one) leaves the GPU's generator
      // where the run's start put it (bpt-train: --seed).
      if (resumed.contains("gpu_rng") && device.is_cuda()) {
        restore_rng(at::globalContext().defaultGenerator(device), resumed, "gpu_rng", resume_from);
      } else if (resumed.contains("gpu_rng")) {
        metrics.note(fmt::format("{}: GPU random state (gpu_rng) ignored: this run is on the {}", resume_from,
                                 device.str()));
      }
    } catch (const nlohmann::json::exception& e) {
      throw_input_error("{}/trainer_state.json: {}", resume_from, e.what());
    }
    metrics.drop_after(result.steps);  // lines a crashed run logged past its last checkpoint
    metrics.note(fmt::format("resumed from {} at step {}", resume_from, result.steps));
  }
  // Every evaluation reads the same batches: the eval loader goes back here each time.
  const nlohmann::json eval_start = eval != nullptr ? eval->state() : nlohmann::json();

  const double flops_per_token = module.flops_per_token(options_.seq_length);
  double peak_flops = options_.peak_flops;
  if (peak_flops <= 0 && flops_per_token > 0) peak_flops = measure_peak_flops(dtype, device);
  peak_flops *= ranks;  // the whole world's
  const auto trainer_state = [&] {
    nlohmann::json config = nlohmann::json::object();
    for (const auto& [name, value] : options_.run_config) config[name] = value;
    nlohmann::json state = {{"step", result.steps},
                            {"skipped_steps", result.skipped_steps},
                            {"dataset", train.state()},
                            {"config", config},
                            {"rng", rng_state(at::detail::getDefaultCPUGenerator())}};
    if (device.is_cuda()) state["gpu_rng"] = rng_state(at::globalContext().defaultGenerator(device));
    return state;
  };
  const auto save = [&](const std::string& name) {
    checkpointer.save(name, module, optimizer, trainer_state());
    metrics.note(fmt::format("step {}: saved {}/{}", result.steps, options_.output_dir, name));
  };

  const auto run_start = Clock::now();
  const int64_t first_step = result.steps;
  int64_t last_saved = -1;
  double window_loss = 0, window_tokens = 0, window_correct = 0, window_seconds = 0, window_norm = 0;
  int64_t window_steps = 0, window_micro_batches = 0;
  std::map<std::string, double> window_metrics;
  const double state_mb = static_cast<double>(module.held_bytes() + optimizer.state_bytes()) / 1e6;
  int64_t window_comm_start = module.communicated_bytes();
  // GPU memory peaks per log window, as torchtitan's: not counting the peak-FLOP/s matmul,
  // whose blocks the cache gives back first.
  release_cached_device_memory(device);
  reset_device_memory_peaks(device);
  // Every rank stops at the same step: a signal reaching one rank is shared in an all-reduce.
  const auto should_stop = [&] { return world_.sum({stop_requested ? 1.0 : 0.0})[0] > 0; };
  while (result.steps < options_.total_steps && !should_stop()) {
    const auto step_start = Clock::now();
    double loss_sum = 0;
    for (int64_t micro = 0; micro < options_.accumulate_gradient_steps; ++micro) {
      const data::Batch batch = slice_rows(train.next(), world_.rank(), world_.size());
      const StepOutput out = module.training_step(batch);
      for (const auto& [name, value] : out.metrics) window_metrics[name] += value;
      ++window_micro_batches;
      // The mean over every rank's tokens: each rank's mean weighted by its share of them
      // (times the rank count, which the gradient average divides out again).
      const double n = static_cast<double>(out.n_tokens);
      const auto totals = world_.sum({out.loss.item<double>() * n, n, static_cast<double>(out.n_correct)});
      const double weight = totals[1] > 0 ? n * ranks / totals[1] : 0.0;
      (out.loss * (weight / static_cast<double>(options_.accumulate_gradient_steps))).backward();
      loss_sum += totals[1] > 0 ? totals[0] / totals[1] : 0.0;
      window_tokens += totals[1];
      window_correct += totals[2];
    }
    module.finish_backward();
    const StepReport report = optimizer.step();
    ++result.steps;
    result.last_loss = loss_sum / static_cast<double>(options_.accumulate_gradient_steps);
    if (report.skipped) {
      ++result.skipped_steps;
      metrics.note(fmt::format("step {}: gradient norm is {}, update skipped", result.steps, report.grad_norm));
    }
    window_loss += result.last_loss;
    window_norm += report.skipped ? 0 : report.grad_norm;
    window_seconds += seconds_since(step_start);
    ++window_steps;

    if (result.steps % options_.log_freq == 0 || result.steps == options_.total_steps) {
      const double tokens_per_s = window_tokens / window_seconds;
      nlohmann::json record = {{"step", result.steps},
                               {"loss", window_loss / window_steps},
                               {"accuracy", window_tokens > 0 ? window_correct / window_tokens : 0.0},
                               {"lr", report.lr},
                               {"grad_norm", window_norm / window_steps},
                               {"tokens_per_s", tokens_per_s},
                               {"peak_memory_mb", peak_memory_mb()},
                               {"state_mb", state_mb},
                               {"skipped_steps", result.skipped_steps},
                               {"time_s", seconds_since(run_start)}};
      if (flops_per_token > 0 && peak_flops > 0) record["mfu"] = flops_per_token * tokens_per_s / peak_flops;
      if (const auto gpu = device_memory_peaks(device)) {  // this rank's GPU
        record["gpu_peak_allocated_mb"] = gpu->allocated_mb;
        record["gpu_peak_reserved_mb"] = gpu->reserved_mb;
        reset_device_memory_peaks(device);
      }
      for (const auto& [name, sum] : window_metrics) record[name] = sum / static_cast<double>(window_micro_batches);
      window_metrics.clear();
      window_micro_batches = 0;
      if (world_.size() > 1) {
        record["world_size"] = world_.size();
        record["comm_mb_per_step"] =
            static_cast<double>(module.communicated_bytes() - window_comm_start) / 1e6 / window_steps;
        window_comm_start = module.communicated_bytes();
      }
      const double per_step = seconds_since(run_start) / static_cast<double>(result.steps - first_step);
      metrics.log(record, per_step * static_cast<double>(options_.total_steps - result.steps));
      window_loss = window_tokens = window_correct = window_seconds = window_norm = 0;
      window_steps = 0;
    }
    if (eval != nullptr && options_.eval_freq > 0 && result.steps % options_.eval_freq == 0) {
      at::NoGradGuard no_grad;
      eval->restore(eval_start);
      double loss = 0, tokens = 0, correct = 0;
      for (int64_t i = 0; i < options_.eval_steps; ++i) {
        const auto out = module.validation_step(slice_rows(eval->next(), world_.rank(), world_.size()));
        if (!out) break;
        const double n = static_cast<double>(out->n_tokens);
        const auto totals = world_.sum({out->loss.item<double>() * n, n, static_cast<double>(out->n_correct)});
        loss += totals[0];
        tokens += totals[1];
        correct += totals[2];
      }
      if (tokens > 0) {
        metrics.write({{"step", result.steps}, {"eval_loss", loss / tokens}, {"eval_accuracy", correct / tokens}});
        metrics.note(fmt::format("step {}: eval loss {:.4f}, accuracy {:.3f}", result.steps, loss / tokens,
                                 correct / tokens));
      }
    }
    if (options_.save_milestone_freq > 0 && result.steps % options_.save_milestone_freq == 0) {
      save(fmt::format("milestone-{:08d}", result.steps));
    }
    if (options_.save_model_freq > 0 && result.steps % options_.save_model_freq == 0) {
      save("checkpoint");
      last_saved = result.steps;
    }
  }
  result.interrupted = result.steps < options_.total_steps;
  if (last_saved != result.steps && result.steps > first_step) save("checkpoint");
  return result;
}

}  // namespace bpt::train
