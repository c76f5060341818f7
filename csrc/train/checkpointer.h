#pragma once
// Training checkpoints in `output_dir`: `checkpoint/` (the latest, replaced on every save) and
// `milestone-<step>/` (kept). Each is a directory written whole and swapped in atomically
// (io::AtomicDirectory), holding the model's files (config.json + safetensors with Hugging
// Face names for LLaMA), `optimizer.safetensors` (if saved) and `trainer_state.json`: step,
// data loader position, random state. A crash at any moment leaves every earlier checkpoint
// complete; latest() finds the newest.
//
// With several ranks (FSDP) every rank writes its part into rank 0's temporary directory;
// after a barrier rank 0 writes trainer_state.json and swaps the directory in, so a
// checkpoint is complete only when every rank's part is.
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <optional>
#include <string>

#include "csrc/dist/process_group.h"
#include "csrc/train/adamw.h"
#include "csrc/train/module.h"

namespace bpt::train {

class Checkpointer {
 public:
  // save_delay_ms: a pause inside every save, before it is complete (crash tests only).
  // `world`: the ranks that save together (all of them call save()).
  Checkpointer(std::string output_dir, bool save_optimizer_state, int64_t save_delay_ms = 0,
               dist::Group world = {});

  // Saves into output_dir/<name>; trainer_state is written as trainer_state.json.
  void save(const std::string& name, const TrainModule& module, const AdamW& optimizer,
            const nlohmann::json& trainer_state) const;
  // The newest complete checkpoint (by step) in output_dir, if any.
  std::optional<std::string> latest() const;

  // trainer_state.json of the checkpoint in `dir`; InputError if missing or malformed.
  static nlohmann::json read_state(const std::string& dir);

 private:
  // Removes `<name>.tmp-<pid>` directories whose process is gone (a run killed while saving).
  void remove_dead_temporaries() const;
  std::string output_dir_;
  bool save_optimizer_state_;
  int64_t save_delay_ms_;
  dist::Group world_;
};

}  // namespace bpt::train
