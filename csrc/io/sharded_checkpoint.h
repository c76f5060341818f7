#pragma once
// Checkpoints written by FSDP ranks (csrc/dist/fsdp.h): every rank saves the pieces of the
// flattened parameters it holds, and an index says how to put them back together, so a
// checkpoint saved at one world size loads at any other (and bpt-convert gathers it into
// Hugging Face safetensors).
//
//   shards.json                                  {"format": "bpt-fsdp", "ranks": n,
//                                                 "files": {"model": [...], "optimizer": [...]},
//                                                 "tensors": {name: {"shape": [..],
//                                                   "pieces": [[rank, offset, numel], ...]}}}
//   model-rank-0000r-of-0000n.safetensors        shard r's 1-D pieces, each under its tensor's name
//   optimizer-rank-0000r-of-0000n.safetensors    "<name>.exp_avg", "<name>.exp_avg_sq",
//                                                "<name>.master" pieces (laid out as <name>), and
//                                                "step" whole (read from rank 0's file)
//
// offset and numel count elements of the flattened (row-major) tensor; a tensor's pieces, in
// order, cover it exactly. "rank" is the shard's index (an FSDP run's rank within its fsdp
// group: replicas hold the same shards and only the first writes them), "ranks" the number
// of shards.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "csrc/io/safetensors.h"

namespace bpt::io {

struct Piece {
  int64_t rank = 0, offset = 0, numel = 0;
};

struct ShardedTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<Piece> pieces;  // in offset order
};

// "model-rank-00001-of-00004.safetensors" for kind "model", rank 1 of 4.
std::string shard_file_name(const std::string& kind, int64_t rank, int64_t ranks);

// Writes dir/shards.json (atomically) for files of `kinds` ("model", "optimizer") from `ranks` ranks.
void write_shard_index(const std::string& dir, int64_t ranks, const std::vector<ShardedTensor>& tensors,
                       const std::vector<std::string>& kinds);

// Whether `dir` holds a sharded checkpoint (a shards.json).
bool is_sharded_checkpoint(const std::string& dir);

// The tensors of one kind of a sharded checkpoint, whole. Opening validates the index and
// that every file it lists is there (a checkpoint missing a rank's part is refused);
// tensor() checks each piece against the index.
class ShardedReader : public TensorReader {
 public:
  ShardedReader(const std::string& dir, const std::string& kind);
  ~ShardedReader() override;

  std::vector<std::string> names() const override;
  bool contains(const std::string& name) const override;
  const TensorInfo& info(const std::string& name) const override;
  at::Tensor tensor(const std::string& name) const override;
  std::string where(const std::string& name) const override;

 private:
  struct Entry;
  const Entry& entry(const std::string& name) const;
  std::string index_path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;  // by rank
  std::vector<std::unique_ptr<Entry>> entries_;  // in file order
  std::map<std::string, const Entry*> by_name_;
};

// A checkpoint's weights: the Hugging Face layout (SafetensorsDir) or a sharded one.
std::unique_ptr<TensorReader> open_weights(const std::string& dir);
// Its optimizer state: optimizer.safetensors or the sharded files; nullptr if it has none.
std::unique_ptr<TensorReader> open_optimizer_state(const std::string& dir);

}  // namespace bpt::io
