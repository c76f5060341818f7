#include "csrc/train/checkpointer.h"

#include <ATen/ATen.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"

namespace bpt::train {
namespace fs = std::filesystem;

Checkpointer::Checkpointer(std::string output_dir, bool save_optimizer_state, int64_t save_delay_ms,
                           dist::Group world)
    : output_dir_(std::move(output_dir)),
      save_optimizer_state_(save_optimizer_state),
      save_delay_ms_(save_delay_ms),
      world_(std::move(world)) {
  fs::create_directories(output_dir_);
  if (world_.rank() == 0) remove_dead_temporaries();
  world_.barrier();  // no rank looks for checkpoints while rank 0 cleans up
}

void Checkpointer::remove_dead_temporaries() const {
  // Left by a run killed while saving (its process is gone): never complete, never read.
  for (const auto& entry : fs::directory_iterator(output_dir_)) {
    const std::string name = entry.path().filename().string();
    const size_t tmp = name.find(".tmp-");
    if (tmp == std::string::npos) continue;
    const pid_t pid = static_cast<pid_t>(std::atoll(name.c_str() + tmp + 5));
    if (pid > 0 && ::kill(pid, 0) != 0 && errno == ESRCH) fs::remove_all(entry.path());
  }
}

void Checkpointer::save(const std::string& name, const TrainModule& module, const AdamW& optimizer,
                        const nlohmann::json& trainer_state) const {
  // Rank 0 owns the temporary directory; the others write into it (a filesystem they share).
  std::optional<io::AtomicDirectory> dir;
  if (world_.rank() == 0) dir.emplace((fs::path(output_dir_) / name).string());
  const std::string path = world_.broadcast(dir ? dir->path() : "");

  module.save(path);
  if (save_optimizer_state_) module.save_optimizer(path, optimizer);
  if (save_delay_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(save_delay_ms_));
  world_.barrier();  // every rank's part is on disk
  if (dir) {
    io::write_file_atomically((fs::path(path) / "trainer_state.json").string(), trainer_state.dump(1) + "\n");
    dir->commit();
  }
  world_.barrier();  // no rank goes on (and perhaps reads it) before it is in place
}

std::optional<std::string> Checkpointer::latest() const {
  std::optional<std::string> best;
  int64_t best_step = -1;
  for (const auto& entry : fs::directory_iterator(output_dir_)) {
    const fs::path state = entry.path() / "trainer_state.json";
    if (!entry.is_directory() || entry.path().filename().string().find(".tmp-") != std::string::npos ||
        !fs::exists(state)) {
      continue;
    }
    std::ifstream stream(state);
    const nlohmann::json json = nlohmann::json::parse(stream, nullptr, /*allow_exceptions=*/false);
    if (json.is_object() && json.contains("step") && json["step"].is_number_integer() &&
        json["step"].get<int64_t>() > best_step) {
      best_step = json["step"].get<int64_t>();
      best = entry.path().string();
    }
  }
  return best;
}

nlohmann::json Checkpointer::read_state(const std::string& dir) {
  const fs::path state_path = fs::path(dir) / "trainer_state.json";
  std::ifstream stream(state_path);
  if (!stream) throw_input_error("{}: not a training checkpoint (no trainer_state.json)", dir);
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(stream);
  } catch (const nlohmann::json::exception& e) {
    throw_input_error("{}: not valid JSON: {}", state_path.string(), e.what());
  }
  if (!state.is_object() || !state.contains("step") || !state["step"].is_number_integer() ||
      !state.contains("dataset")) {
    throw_input_error("{}: expected {{\"step\": int, \"dataset\": ...}}", state_path.string());
  }
  return state;
}

}  // namespace bpt::train
