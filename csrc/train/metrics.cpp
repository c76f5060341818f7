#include "csrc/train/metrics.h"

#include <c10/core/CachingDeviceAllocator.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"

namespace bpt::train {

double peak_memory_mb() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}

std::optional<DeviceMemoryPeaks> device_memory_peaks(c10::Device device) {
  if (device.is_cpu()) return std::nullopt;
  c10::DeviceAllocator* allocator = c10::getDeviceAllocator(device.type());
  if (!allocator->initialized()) return std::nullopt;
  const auto stats = allocator->getDeviceStats(device.index());
  constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  constexpr double kMB = 1024.0 * 1024.0;
  return DeviceMemoryPeaks{static_cast<double>(stats.allocated_bytes[all].peak) / kMB,
                           static_cast<double>(stats.reserved_bytes[all].peak) / kMB};
}

void reset_device_memory_peaks(c10::Device device) {
  if (device.is_cpu()) return;
  c10::DeviceAllocator* allocator = c10::getDeviceAllocator(device.type());
  if (allocator->initialized()) allocator->resetPeakStats(device.index());
}

void release_cached_device_memory(c10::Device device) {
  if (device.is_cpu()) return;
  c10::DeviceAllocator* allocator = c10::getDeviceAllocator(device.type());
  if (allocator->initialized()) allocator->emptyCache();
}

MetricsLog::MetricsLog(const std::string& output_dir, const std::string& progress, int64_t total_steps, bool enabled)
    : bar_(progress == "always" || (progress == "auto" && ::isatty(::fileno(stdout)))),
      total_steps_(total_steps),
      enabled_(enabled) {
  if (progress != "auto" && progress != "always" && progress != "never") {
    throw_input_error("progress: expected auto, always or never, got '{}'", progress);
  }
  if (!enabled_) return;
  std::filesystem::create_directories(output_dir);
  path_ = (std::filesystem::path(output_dir) / "metrics.jsonl").string();
  file_ = std::fopen(path_.c_str(), "a");
  if (file_ == nullptr) throw_input_error("{}: cannot open for writing", path_);
}

MetricsLog::~MetricsLog() {
  if (bar_drawn_) std::printf("\n");
  if (file_ != nullptr) std::fclose(file_);
}

namespace {

std::string duration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds);
  if (s >= 3600) return fmt::format("{}h{:02d}m", s / 3600, (s % 3600) / 60);
  if (s >= 60) return fmt::format("{}m{:02d}s", s / 60, s % 60);
  return fmt::format("{}s", s);
}

}  // namespace

void MetricsLog::write(const nlohmann::json& record) {
  if (!enabled_) return;
  std::fprintf(file_, "%s\n", record.dump().c_str());
  std::fflush(file_);
}

void MetricsLog::drop_after(int64_t step) {
  if (!enabled_) return;
  std::fclose(file_);
  std::string kept;
  std::ifstream stream(path_);
  for (std::string line; std::getline(stream, line);) {
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_object() && record.contains("step") && record["step"].is_number_integer() &&
        record["step"].get<int64_t>() > step) {
      continue;
    }
    kept += line + "\n";
  }
  io::write_file_atomically(path_, kept);
  file_ = std::fopen(path_.c_str(), "a");
  if (file_ == nullptr) throw_input_error("{}: cannot open for writing", path_);
}

void MetricsLog::log(const nlohmann::json& record, double eta_s) {
  if (!enabled_) return;
  write(record);
  const int64_t step = record["step"].get<int64_t>();
  std::string line = fmt::format("step {}/{}  loss {:.4f}  lr {:.2e}  {:.0f} tok/s", step, total_steps_,
                                 record["loss"].get<double>(), record["lr"].get<double>(),
                                 record["tokens_per_s"].get<double>());
  if (record.contains("mfu")) line += fmt::format("  MFU {:.1f}%", 100 * record["mfu"].get<double>());
  if (record.contains("gpu_peak_allocated_mb")) {
    line += fmt::format("  GPU {:.2f} GiB", record["gpu_peak_allocated_mb"].get<double>() / 1024);
  }
  line += fmt::format("  ETA {}", duration(eta_s));
  if (bar_) {
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(kWidth * step / std::max<int64_t>(total_steps_, 1));
    std::printf("\r\033[K[%s%s] %s", std::string(filled, '#').c_str(), std::string(kWidth - filled, '.').c_str(),
                line.c_str());
    bar_drawn_ = true;
  } else {
    std::printf("%s\n", line.c_str());
  }
  std::fflush(stdout);
}

void MetricsLog::note(const std::string& line) {
  if (!enabled_) return;
  std::printf(bar_drawn_ ? "\r\033[K%s\n" : "%s\n", line.c_str());
  bar_drawn_ = false;
  std::fflush(stdout);
}

}  // namespace bpt::train
