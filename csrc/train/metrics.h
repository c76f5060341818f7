#pragma once
// What a training run reports: one JSON line per logged step in metrics.jsonl (always), and
// on a terminal a progress line redrawn in place (step, loss, lr, tokens/s, MFU, a GPU's peak
// memory, ETA); off a terminal a plain line per log step.
#include <c10/core/Device.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdio>
#include <optional>
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

// A GPU's peaks in its caching allocator since the last reset_device_memory_peaks (or the
// process's start), in MB (2^20 bytes, as peak_memory_mb): `allocated_mb` what tensors held at
// most (torch.cuda.max_memory_allocated), `reserved_mb` what the allocator took from the
// device, cached blocks included (torch.cuda.max_memory_reserved; nvidia-smi shows this plus
// the CUDA context). Device-generic (c10::DeviceAllocator): no CUDA headers.
struct DeviceMemoryPeaks {
  double allocated_mb = 0;
  double reserved_mb = 0;
};

// nullopt for the CPU, or a device whose allocator has not been used yet. `device` names its
// index (a tensor's device does).
std::optional<DeviceMemoryPeaks> device_memory_peaks(c10::Device device);
// The peaks come down to what is held now, starting the next window; nothing for the CPU.
void reset_device_memory_peaks(c10::Device device);
// The caching allocator gives its free blocks back to the device (torch.cuda.empty_cache), so
// that the reserved peak starts from what tensors hold; nothing for the CPU.
void release_cached_device_memory(c10::Device device);

}  // namespace bpt::train
