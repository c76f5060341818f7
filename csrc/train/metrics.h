#pragma once
// What a training run reports: one JSON line per logged step in metrics.jsonl (always), and
// on a terminal a progress line redrawn in place (step, loss, lr, tokens/s, MFU, ETA); off a
// terminal a plain line per log step.
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <string>

namespace bpt::train {

class MetricsLog {
 public:
  // Appends to output_dir/metrics.jsonl; `progress`: auto, always or never. Not `enabled`
  // (a rank other than 0 of a distributed run): writes and prints nothing.
  MetricsLog(const std::string& output_dir, const std::string& progress, int64_t total_steps, bool enabled = true);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;

  // `record` holds at least step, loss, lr, tokens_per_s; eta_s is the estimated time left.
  void log(const nlohmann::json& record, double eta_s);
  // A line that must not be overwritten by the bar (evaluation, checkpoints, warnings).
  void note(const std::string& line);
  // A metrics.jsonl line only.
  void write(const nlohmann::json& record);
  // Removes the lines of steps after `step` (logged by a run that crashed before saving them).
  void drop_after(int64_t step);

 private:
  std::string path_;
  std::FILE* file_ = nullptr;
  bool bar_;
  bool bar_drawn_ = false;
  int64_t total_steps_;
  bool enabled_;
};

// Peak resident memory of this process so far, in MB (Linux VmHWM).
double peak_memory_mb();

}  // namespace bpt::train
