#include "csrc/io/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"

namespace bpt::io {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

// The safetensors reference implementation refuses headers above 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

constexpr std::pair<const char*, at::ScalarType> kDtypes[] = {
    {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf},   {"BF16", at::kBFloat16}, {"I64", at::kLong},
    {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},    {"U8", at::kByte},       {"BOOL", at::kBool},
};

std::optional<at::ScalarType> parse_dtype(const std::string& name) {
  for (const auto& [text, dtype] : kDtypes) {
    if (name == text) return dtype;
  }
  return std::nullopt;
}

// One tensor's header entry, checked against the data section of `data_size` bytes.
TensorInfo parse_entry(const std::string& where, const json& entry, uint64_t data_size) {
  if (!entry.is_object()) throw_input_error("{}: header entry is not an object", where);
  const auto dtype_it = entry.find("dtype");
  const auto shape_it = entry.find("shape");
  const auto offsets_it = entry.find("data_offsets");
  if (dtype_it == entry.end() || !dtype_it->is_string()) throw_input_error("{}: missing string 'dtype'", where);
  if (shape_it == entry.end() || !shape_it->is_array()) throw_input_error("{}: missing array 'shape'", where);
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2) {
    throw_input_error("{}: missing 'data_offsets' [begin, end]", where);
  }
  TensorInfo info;
  const auto dtype = parse_dtype(dtype_it->get<std::string>());
  if (!dtype) {
    throw_input_error("{}: dtype '{}' is not supported (F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)", where,
                      dtype_it->get<std::string>());
  }
  info.dtype = *dtype;
  uint64_t numel = 1;
  for (const json& dim : *shape_it) {
    if (!dim.is_number_unsigned() || dim.get<uint64_t>() > uint64_t(INT64_MAX) ||
        __builtin_mul_overflow(numel, dim.get<uint64_t>(), &numel)) {
      throw_input_error("{}: shape {} has a dimension that is not a size, or too many elements", where,
                        shape_it->dump());
    }
    info.shape.push_back(dim.get<int64_t>());
  }
  for (const json& offset : *offsets_it) {
    if (!offset.is_number_unsigned()) throw_input_error("{}: data_offsets {} are not byte offsets", where, offsets_it->dump());
  }
  info.begin = (*offsets_it)[0].get<uint64_t>();
  info.end = (*offsets_it)[1].get<uint64_t>();
  if (info.begin > info.end) throw_input_error("{}: data_offsets [{}, {}] run backwards", where, info.begin, info.end);
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(numel, uint64_t(c10::elementSize(info.dtype)), &bytes)) {
    throw_input_error("{}: shape {} is too large", where, shape_it->dump());
  }
  if (info.end - info.begin != bytes) {
    throw_input_error("{}: {} {} needs {} bytes, data_offsets [{}, {}] hold {}", where, dtype_it->get<std::string>(),
                      shape_string(info.shape), bytes, info.begin, info.end, info.end - info.begin);
  }
  if (info.end > data_size) {
    throw_input_error("{}: data ends at byte {} but the file holds {} data bytes (truncated?)", where, info.end,
                      data_size);
  }
  return info;
}

}  // namespace

std::string shape_string(at::IntArrayRef shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

std::string dtype_name(at::ScalarType dtype) {
  for (const auto& [text, known] : kDtypes) {
    if (known == dtype) return text;
  }
  throw_input_error("safetensors: dtype {} cannot be stored", c10::toString(dtype));
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw_input_error("{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw_input_error("{}: not a regular file", path);
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    throw_input_error("{}: {} bytes, too short for a safetensors file (truncated?)", path, map_size_);
  }
  void* map = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) throw_input_error("{}: cannot map: {}", path, std::strerror(errno));
  map_ = static_cast<const uint8_t*>(map);

  try {
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | map_[i];  // little-endian
    if (header_size > kMaxHeaderBytes || header_size > map_size_ - 8) {
      throw_input_error("{}: header claims {} bytes but the file has {} (truncated or not safetensors?)", path,
                        header_size, map_size_);
    }
    data_ = map_ + 8 + header_size;
    const uint64_t data_size = map_size_ - 8 - header_size;
    json header;
    try {
      header = json::parse(map_ + 8, map_ + 8 + header_size);
    } catch (const json::exception& e) {
      throw_input_error("{}: header is not valid JSON: {}", path, e.what());
    }
    if (!header.is_object()) throw_input_error("{}: header is not a JSON object", path);
    for (const auto& [name, entry] : header.items()) {
      if (name == "__metadata__") {
        if (!entry.is_object()) throw_input_error("{}: __metadata__ is not an object", path);
        for (const auto& [key, value] : entry.items()) {
          if (!value.is_string()) throw_input_error("{}: __metadata__ '{}' is not a string", path, key);
          metadata_[key] = value.get<std::string>();
        }
        continue;
      }
      tensors_[name] = parse_entry(fmt::format("{}: tensor '{}'", path, name), entry, data_size);
    }
    // No two tensors may share bytes: in offset order, each non-empty tensor starts at or after
    // the furthest end seen so far.
    const std::string* furthest = nullptr;
    for (const std::string& name : names()) {
      const TensorInfo& info = tensors_.at(name);
      if (info.begin == info.end) continue;
      if (furthest != nullptr && info.begin < tensors_.at(*furthest).end) {
        const TensorInfo& other = tensors_.at(*furthest);
        throw_input_error("{}: tensors '{}' [{}, {}] and '{}' [{}, {}] overlap", path, *furthest, other.begin,
                          other.end, name, info.begin, info.end);
      }
      if (furthest == nullptr || info.end > tensors_.at(*furthest).end) furthest = &name;
    }
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(map_), map_size_);
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { ::munmap(const_cast<uint8_t*>(map_), map_size_); }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> result;
  for (const auto& [name, info] : tensors_) result.push_back(name);
  std::stable_sort(result.begin(), result.end(), [&](const std::string& a, const std::string& b) {
    return tensors_.at(a).begin < tensors_.at(b).begin;
  });
  return result;
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) throw_input_error("{}: no tensor '{}'", path_, name);
  return it->second;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo& meta = info(name);
  at::Tensor result = at::empty(meta.shape, at::TensorOptions().dtype(meta.dtype));
  std::memcpy(result.data_ptr(), data_ + meta.begin, meta.end - meta.begin);
  return result;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> stored;
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(!header.contains(name), "save_safetensors: tensor '", name, "' given twice");
    stored.push_back(tensor.detach().to(at::kCPU).contiguous());
    const uint64_t bytes = stored.back().nbytes();
    header[name] = {{"dtype", dtype_name(tensor.scalar_type())},
                    {"shape", tensor.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as HF writes it
  uint8_t size_bytes[8];
  for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<uint8_t>(uint64_t(text.size()) >> (8 * i));

  AtomicFile file(path);
  file.write(size_bytes, sizeof(size_bytes));
  file.write(text);
  for (const at::Tensor& tensor : stored) file.write(tensor.data_ptr(), tensor.nbytes());
  file.commit();
}

SafetensorsDir::SafetensorsDir(const std::string& dir) : dir_(dir) {
  const fs::path root(dir);
  const fs::path index_path = root / "model.safetensors.index.json";
  const fs::path single_path = root / "model.safetensors";
  if (!fs::is_directory(root)) throw_input_error("{}: not a directory", dir);
  if (fs::exists(index_path)) {
    json index;
    try {
      std::ifstream stream(index_path);
      index = json::parse(stream);
    } catch (const json::exception& e) {
      throw_input_error("{}: not valid JSON: {}", index_path.string(), e.what());
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      throw_input_error("{}: expected an object with a 'weight_map' of tensor name -> file", index_path.string());
    }
    std::map<std::string, const SafetensorsFile*> opened;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string()) throw_input_error("{}: weight_map['{}'] is not a file name", index_path.string(), name);
      const std::string shard = file.get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos) {
        throw_input_error("{}: weight_map['{}'] = '{}' is not a file in this directory", index_path.string(), name,
                          shard);
      }
      if (!opened.count(shard)) {
        files_.push_back(std::make_unique<SafetensorsFile>((root / shard).string()));
        opened[shard] = files_.back().get();
      }
      if (!opened[shard]->contains(name)) {
        throw_input_error("{}: lists '{}' in {}, which does not hold it", index_path.string(), name, shard);
      }
      file_of_[name] = opened[shard];
    }
  } else if (fs::exists(single_path)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single_path.string()));
    for (const std::string& name : files_.back()->names()) file_of_[name] = files_.back().get();
  } else {
    throw_input_error("{}: no model.safetensors or model.safetensors.index.json", dir);
  }
}

std::vector<std::string> SafetensorsDir::names() const {
  std::vector<std::string> result;
  for (const auto& [name, file] : file_of_) result.push_back(name);
  return result;
}

const SafetensorsFile& SafetensorsDir::file(const std::string& name) const {
  const auto it = file_of_.find(name);
  if (it == file_of_.end()) throw_input_error("{}: no tensor '{}' in the checkpoint", dir_, name);
  return *it->second;
}

std::vector<std::string> save_safetensors_dir(const std::string& dir, const NamedTensors& tensors,
                                              int64_t max_shard_bytes,
                                              const std::map<std::string, std::string>& metadata) {
  TORCH_CHECK(max_shard_bytes > 0, "save_safetensors_dir: max_shard_bytes must be positive, got ", max_shard_bytes);
  fs::create_directories(dir);
  // Group tensors into shards in order; a tensor larger than the limit gets a shard of its own.
  std::vector<NamedTensors> shards(1);
  int64_t shard_bytes = 0, total_bytes = 0;
  for (const auto& named : tensors) {
    const int64_t bytes = named.second.numel() * named.second.element_size();
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(named);
    shard_bytes += bytes;
    total_bytes += bytes;
  }

  std::vector<std::string> written;
  json weight_map = json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string file = shards.size() == 1
                                 ? std::string("model.safetensors")
                                 : fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
    save_safetensors((fs::path(dir) / file).string(), shards[i], metadata);
    written.push_back(file);
    for (const auto& named : shards[i]) weight_map[named.first] = file;
  }
  if (shards.size() > 1) {
    const json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    write_file_atomically((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
    written.push_back("model.safetensors.index.json");
  }
  // Weight files of an earlier save that this one did not rewrite would be read as ours.
  for (const auto& entry : fs::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    const bool weights = name == "model.safetensors" || name == "model.safetensors.index.json" ||
                         (name.rfind("model-", 0) == 0 && name.ends_with(".safetensors"));
    if (weights && std::find(written.begin(), written.end(), name) == written.end()) fs::remove(entry.path());
  }
  return written;
}

}  // namespace bpt::io
