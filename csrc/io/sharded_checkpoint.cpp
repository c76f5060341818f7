#include "csrc/io/sharded_checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "csrc/common/error.h"
#include "csrc/io/atomic_file.h"

namespace bpt::io {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kIndex = "shards.json";
constexpr const char* kFormat = "bpt-fsdp";

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

// The index's entry for `name`, checked: shape of non-negative sizes, pieces that cover it.
ShardedTensor parse_tensor(const std::string& where, const std::string& name, const json& value, int64_t ranks) {
  ShardedTensor tensor;
  tensor.name = name;
  const auto bad = [&](const std::string& what) { throw_input_error("{}: tensor '{}': {}", where, name, what); };
  if (!value.is_object() || !value.contains("shape") || !value["shape"].is_array() || !value.contains("pieces") ||
      !value["pieces"].is_array()) {
    bad("expected {\"shape\": [...], \"pieces\": [[rank, offset, numel], ...]}");
  }
  for (const json& d : value["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0) bad("shape holds a size that is not an integer >= 0");
    tensor.shape.push_back(d.get<int64_t>());
  }
  int64_t covered = 0;
  for (const json& p : value["pieces"]) {
    if (!p.is_array() || p.size() != 3 || !p[0].is_number_integer() || !p[1].is_number_integer() ||
        !p[2].is_number_integer()) {
      bad("a piece is not [rank, offset, numel]");
    }
    const Piece piece{p[0].get<int64_t>(), p[1].get<int64_t>(), p[2].get<int64_t>()};
    if (piece.rank < 0 || piece.rank >= ranks) bad(fmt::format("a piece names rank {} of {}", piece.rank, ranks));
    if (piece.offset != covered || piece.numel <= 0) {
      bad(fmt::format("pieces must cover the tensor in order; expected one at offset {}", covered));
    }
    covered += piece.numel;
    tensor.pieces.push_back(piece);
  }
  if (covered != numel_of(tensor.shape)) {
    bad(fmt::format("pieces cover {} elements, the shape {} has {}", covered, shape_string(tensor.shape),
                    numel_of(tensor.shape)));
  }
  return tensor;
}

}  // namespace

struct ShardedReader::Entry {
  std::string name;
  TensorInfo info;            // dtype and whole shape
  std::vector<Piece> pieces;  // empty: stored whole in rank 0's file
};

std::string shard_file_name(const std::string& kind, int64_t rank, int64_t ranks) {
  return fmt::format("{}-rank-{:05d}-of-{:05d}.safetensors", kind, rank, ranks);
}

void write_shard_index(const std::string& dir, int64_t ranks, const std::vector<ShardedTensor>& tensors,
                       const std::vector<std::string>& kinds) {
  json index = {{"format", kFormat}, {"ranks", ranks}, {"files", json::object()}, {"tensors", json::object()}};
  for (const std::string& kind : kinds) {
    json files = json::array();
    for (int64_t rank = 0; rank < ranks; ++rank) files.push_back(shard_file_name(kind, rank, ranks));
    index["files"][kind] = files;
  }
  for (const ShardedTensor& tensor : tensors) {
    json pieces = json::array();
    for (const Piece& piece : tensor.pieces) pieces.push_back({piece.rank, piece.offset, piece.numel});
    index["tensors"][tensor.name] = {{"shape", tensor.shape}, {"pieces", pieces}};
  }
  write_file_atomically((fs::path(dir) / kIndex).string(), index.dump(1) + "\n");
}

bool is_sharded_checkpoint(const std::string& dir) { return fs::exists(fs::path(dir) / kIndex); }

ShardedReader::ShardedReader(const std::string& dir, const std::string& kind)
    : index_path_((fs::path(dir) / kIndex).string()) {
  std::ifstream stream(index_path_);
  if (!stream) throw_input_error("{}: cannot open", index_path_);
  json index;
  try {
    index = json::parse(stream);
  } catch (const json::exception& e) {
    throw_input_error("{}: not valid JSON: {}", index_path_, e.what());
  }
  if (!index.is_object() || index.value("format", "") != kFormat || !index.contains("ranks") ||
      !index["ranks"].is_number_integer() || index["ranks"].get<int64_t>() < 1 || !index.contains("files") ||
      !index["files"].is_object() || !index.contains("tensors") || !index["tensors"].is_object()) {
    throw_input_error("{}: expected {{\"format\": \"{}\", \"ranks\": n >= 1, \"files\": {{...}}, \"tensors\": {{...}}}}",
                      index_path_, kFormat);
  }
  const int64_t ranks = index["ranks"].get<int64_t>();
  if (!index["files"].contains(kind)) throw_input_error("{}: holds no {} files", index_path_, kind);
  const json& names = index["files"][kind];
  if (!names.is_array() || static_cast<int64_t>(names.size()) != ranks) {
    throw_input_error("{}: files.{}: expected {} file names, one per rank", index_path_, kind, ranks);
  }
  for (const json& name : names) {
    if (!name.is_string() || name.get<std::string>().find('/') != std::string::npos) {
      throw_input_error("{}: files.{}: '{}' is not a file in this directory", index_path_, kind, name.dump());
    }
    const fs::path path = fs::path(dir) / name.get<std::string>();
    if (!fs::exists(path)) {
      throw_input_error("{}: missing (the checkpoint lacks a rank's part: was it copied whole?)", path.string());
    }
    files_.push_back(std::make_unique<SafetensorsFile>(path.string()));
  }
  std::map<std::string, ShardedTensor> layout;
  for (const auto& [name, value] : index["tensors"].items()) layout[name] = parse_tensor(index_path_, name, value, ranks);

  // Every name in the files, with its layout: the tensor's own, or that of the parameter it
  // belongs to ("<param>.exp_avg"), or none (stored whole in rank 0's file).
  for (const auto& file : files_) {
    for (const std::string& name : file->names()) {
      if (by_name_.count(name)) continue;
      auto entry = std::make_unique<Entry>();
      entry->name = name;
      auto it = layout.find(name);
      const size_t dot = name.rfind('.');
      if (it == layout.end() && dot != std::string::npos) it = layout.find(name.substr(0, dot));
      if (it == layout.end()) {
        entry->info = files_[0]->info(name);  // throws, naming the file, if rank 0 lacks it
      } else {
        entry->pieces = it->second.pieces;
        entry->info.shape = it->second.shape;
        if (entry->pieces.empty()) {
          throw_input_error("{}: '{}' has no elements, but {} holds a piece of it", index_path_, name,
                            file->path());
        }
        for (const Piece& piece : entry->pieces) {
          const SafetensorsFile& file = *files_[piece.rank];
          if (!file.contains(name)) throw_input_error("{}: missing piece of '{}' (index: {})", file.path(), name, index_path_);
        }
        entry->info.dtype = files_[entry->pieces.front().rank]->info(name).dtype;
        for (const Piece& piece : entry->pieces) {
          const SafetensorsFile& file = *files_[piece.rank];
          const TensorInfo& info = file.info(name);
          if (info.dtype != entry->info.dtype || info.shape != std::vector<int64_t>{piece.numel}) {
            throw_input_error("{}: piece of '{}' is {} {}, the index expects {} [{}]", file.path(), name,
                              dtype_name(info.dtype), shape_string(info.shape), dtype_name(entry->info.dtype),
                              piece.numel);
          }
        }
      }
      by_name_[name] = entry.get();
      entries_.push_back(std::move(entry));
    }
  }
}

ShardedReader::~ShardedReader() = default;

const ShardedReader::Entry& ShardedReader::entry(const std::string& name) const {
  const auto it = by_name_.find(name);
  if (it == by_name_.end()) throw_input_error("{}: no tensor '{}' in the checkpoint", index_path_, name);
  return *it->second;
}

std::vector<std::string> ShardedReader::names() const {
  std::vector<std::string> result;
  for (const auto& entry : entries_) result.push_back(entry->name);
  return result;
}

bool ShardedReader::contains(const std::string& name) const { return by_name_.count(name) != 0; }

const TensorInfo& ShardedReader::info(const std::string& name) const { return entry(name).info; }

at::Tensor ShardedReader::tensor(const std::string& name) const {
  const Entry& e = entry(name);
  if (e.pieces.empty()) return files_[0]->tensor(name);
  at::Tensor whole = at::empty({numel_of(e.info.shape)}, at::TensorOptions().dtype(e.info.dtype));
  for (const Piece& piece : e.pieces) whole.narrow(0, piece.offset, piece.numel).copy_(files_[piece.rank]->tensor(name));
  return whole.view(e.info.shape);
}

std::string ShardedReader::where(const std::string& name) const {
  const Entry& e = entry(name);
  return e.pieces.size() == 1 || e.pieces.empty() ? files_[e.pieces.empty() ? 0 : e.pieces[0].rank]->path()
                                                   : fmt::format("{} (pieces in {} files)", index_path_, e.pieces.size());
}

std::unique_ptr<TensorReader> open_weights(const std::string& dir) {
  if (is_sharded_checkpoint(dir)) return std::make_unique<ShardedReader>(dir, "model");
  return std::make_unique<SafetensorsDir>(dir);
}

std::unique_ptr<TensorReader> open_optimizer_state(const std::string& dir) {
  const fs::path single = fs::path(dir) / "optimizer.safetensors";
  if (fs::exists(single)) return std::make_unique<SafetensorsFile>(single.string());
  if (is_sharded_checkpoint(dir)) {
    std::ifstream stream(fs::path(dir) / kIndex);
    const json index = json::parse(stream, nullptr, /*allow_exceptions=*/false);
    if (index.is_object() && index.contains("files") && index["files"].is_object() &&
        index["files"].contains("optimizer")) {
      return std::make_unique<ShardedReader>(dir, "optimizer");
    }
  }
  return nullptr;
}

}  // namespace bpt::io
