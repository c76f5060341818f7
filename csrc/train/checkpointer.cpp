#include "csrc/train/checkpointer.h"

#include <filesystem>
#include <fstream>
#include <thread>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"
#include "csrc/io/safetensors.h"

namespace bpt::train {
namespace fs = std::filesystem;

Checkpointer::Checkpointer(std::string output_dir, bool save_optimizer_state)
    : output_dir_(std::move(output_dir)), save_optimizer_state_(save_optimizer_state) {
  fs::create_directories(output_dir_);
  // Left by a run killed while saving: never complete, never read.
  for (const auto& entry : fs::directory_iterator(output_dir_)) {
    if (entry.path().filename().string().find(".tmp-") != std::string::npos) fs::remove_all(entry.path());
  }
}

void Checkpointer::save(const std::string& name, const TrainModule& module, const AdamW& optimizer,
                        const nlohmann::json& trainer_state) const {
  io::AtomicDirectory dir((fs::path(output_dir_) / name).string());
  module.save(dir.path());
  if (save_optimizer_state_) {
    io::save_safetensors((fs::path(dir.path()) / "optimizer.safetensors").string(), optimizer.state());
  }
  // For crash tests: hold the half-written checkpoint open a while.
  if (const char* delay = std::getenv("BPT_CHECKPOINT_DELAY_MS")) {
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(delay)));
  }
  io::write_file_atomically((fs::path(dir.path()) / "trainer_state.json").string(), trainer_state.dump(1) + "\n");
  dir.commit();
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
    if (json.is_object() && json.contains("step") && json["step"].get<int64_t>() > best_step) {
      best_step = json["step"].get<int64_t>();
      best = entry.path().string();
    }
  }
  return best;
}

nlohmann::json Checkpointer::load(const std::string& dir, TrainModule& module, AdamW* optimizer) {
  const fs::path state_path = fs::path(dir) / "trainer_state.json";
  std::ifstream stream(state_path);
  if (!stream) throw_input_error("{}: not a training checkpoint (no trainer_state.json)", dir);
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(stream);
  } catch (const nlohmann::json::exception& e) {
    throw_input_error("{}: not valid JSON: {}", state_path.string(), e.what());
  }
  module.load(dir);
  const fs::path optimizer_path = fs::path(dir) / "optimizer.safetensors";
  if (optimizer != nullptr && fs::exists(optimizer_path)) {
    const io::SafetensorsFile file(optimizer_path.string());
    optimizer->load_state([&](const std::string& name) { return file.tensor(name); });
  }
  return state;
}

}  // namespace bpt::train
