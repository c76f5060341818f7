#pragma once
// Safetensors files (Hugging Face's format): an 8-byte little-endian header size N, N bytes of
// JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
// "__metadata__": {str: str}}, then the tensor bytes, offsets relative to the data start.
//
// Reading memory-maps the file and validates the whole header before any tensor is handed
// out: JSON shape, known dtypes, byte counts equal to the shapes, offsets inside the file and
// no two tensors overlapping. Every error is an InputError naming the file (and tensor).
// Writing goes to a temporary file that is fsynced and renamed: a crash leaves either the old
// file or the complete new one.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace bpt::io {

struct TensorInfo {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section
  uint64_t end = 0;
};

// Named tensors of a checkpoint, whatever its layout (one safetensors file, HF shards, or the
// pieces FSDP ranks wrote: csrc/io/sharded_checkpoint.h). Errors are InputErrors naming files.
class TensorReader {
 public:
  virtual ~TensorReader() = default;
  virtual std::vector<std::string> names() const = 0;
  virtual bool contains(const std::string& name) const = 0;
  // dtype and whole shape (the byte offsets mean something only for one file).
  virtual const TensorInfo& info(const std::string& name) const = 0;
  // An owned, contiguous CPU tensor in its stored dtype.
  virtual at::Tensor tensor(const std::string& name) const = 0;
  // The file (or files) holding `name`, for messages.
  virtual std::string where(const std::string& name) const = 0;
};

class SafetensorsFile : public TensorReader {
 public:
  // Maps and validates `path`; throws InputError if it is missing, truncated or corrupt.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensor names in the order of their bytes in the file.
  std::vector<std::string> names() const override;
  bool contains(const std::string& name) const override { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const override;
  at::Tensor tensor(const std::string& name) const override;
  std::string where(const std::string& /*name*/) const override { return path_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::string path_;
  const uint8_t* map_ = nullptr;  // the whole file
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // the data section inside map_
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes `tensors` (any device; stored as they are, contiguous) to `path`, atomically.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// The weights of a checkpoint directory as Hugging Face lays them out: one
// `model.safetensors`, or shards listed by `model.safetensors.index.json` ("weight_map").
class SafetensorsDir : public TensorReader {
 public:
  // Opens the index (or the single file) and every shard it names; validates that each
  // tensor the index lists is in its shard.
  explicit SafetensorsDir(const std::string& dir);

  const std::string& dir() const { return dir_; }
  std::vector<std::string> names() const override;
  bool contains(const std::string& name) const override { return file_of_.count(name) != 0; }
  // The file holding `name`; throws InputError naming the directory if absent.
  const SafetensorsFile& file(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const override { return file(name).info(name); }
  at::Tensor tensor(const std::string& name) const override { return file(name).tensor(name); }
  std::string where(const std::string& name) const override { return file(name).path(); }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> file_of_;
};

// Writes `tensors` into `dir` as Hugging Face does: `model.safetensors` if they fit in
// `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards (tensors in order, a new
// shard when the next would overflow) and `model.safetensors.index.json`. Stale weight files
// from an earlier save are removed. Returns the files written.
std::vector<std::string> save_safetensors_dir(const std::string& dir, const NamedTensors& tensors,
                                              int64_t max_shard_bytes,
                                              const std::map<std::string, std::string>& metadata = {});

// "F32" <-> at::kFloat, and so on for F64, F16, BF16, I64, I32, I16, I8, U8, BOOL.
std::string dtype_name(at::ScalarType dtype);

// "[64, 32]", for messages.
std::string shape_string(at::IntArrayRef shape);

}  // namespace bpt::io
