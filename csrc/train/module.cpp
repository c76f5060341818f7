#include "csrc/train/module.h"

#include <ATen/ATen.h>

#include <filesystem>

#include "csrc/io/safetensors.h"
#include "csrc/io/sharded_checkpoint.h"

namespace bpt::train {

void TrainModule::save_optimizer(const std::string& dir, const AdamW& optimizer) const {
  io::save_safetensors((std::filesystem::path(dir) / "optimizer.safetensors").string(), optimizer.state());
}

bool TrainModule::load_optimizer(const std::string& dir, AdamW& optimizer) {
  const auto state = io::open_optimizer_state(dir);
  if (!state) return false;
  optimizer.load_state([&](const std::string& name) { return state->tensor(name); });
  return true;
}

int64_t TrainModule::held_bytes() {
  int64_t bytes = 0;
  for (const auto& [name, parameter] : named_parameters()) bytes += 2 * parameter.nbytes();  // and its gradient
  return bytes;
}

}  // namespace bpt::train
