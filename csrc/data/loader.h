#pragma once
// Batches for training: [B, T] input ids, next-token targets (-100 where no loss) and segment
// ids, from documents packed end to end so no token is padding. Documents keep their own
// segment id within a row, so attention never crosses from one into the next, and a target is
// never the first token of another document. A document longer than the space left in a row
// continues in the next row.
//
// The loader's position (epoch, document, token) is part of a checkpoint: restoring it
// replays exactly the batches a run that never stopped would have seen.
#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "csrc/data/jsonl.h"
#include "csrc/data/text_processor.h"

namespace bpt::data {

struct Batch {
  at::Tensor input_ids, targets, segment_ids;  // [B, T] int64
};

class DataLoader {
 public:
  virtual ~DataLoader() = default;
  virtual Batch next() = 0;
  virtual nlohmann::json state() const = 0;
  // InputError if `state` does not belong to this kind of loader.
  virtual void restore(const nlohmann::json& state) = 0;
};

struct PackingOptions {
  int64_t seq_length = 2048;
  int64_t batch_size = 8;
  uint64_t seed = 0;
  bool shuffle = true;         // a new permutation of the documents each epoch
  int64_t tokenizer_threads = 1;  // llamabpt's tokenizer_processes
};

class PackedLoader : public DataLoader {
 public:
  PackedLoader(std::shared_ptr<const JsonlCorpus> corpus, std::shared_ptr<const TextProcessor> processor,
               PackingOptions options);

  Batch next() override;
  nlohmann::json state() const override;  // {"epoch", "document", "token"}
  void restore(const nlohmann::json& state) override;

 private:
  // The tokenized document at position `position` of the current epoch's order.
  const TokenizedDocument& document(int64_t position);
  void start_epoch(int64_t epoch);

  std::shared_ptr<const JsonlCorpus> corpus_;
  std::shared_ptr<const TextProcessor> processor_;
  PackingOptions options_;
  std::vector<int64_t> order_;  // document indices of the current epoch
  int64_t epoch_ = 0, position_ = 0, token_ = 0;
  std::map<int64_t, TokenizedDocument> ready_;  // tokenized ahead, by position
};

// Uniformly random tokens: for benchmarks, where only shapes and speed matter.
class SyntheticLoader : public DataLoader {
 public:
  SyntheticLoader(int64_t vocab_size, int64_t seq_length, int64_t batch_size, uint64_t seed);
  Batch next() override;
  nlohmann::json state() const override;  // {"synthetic_batches"}
  void restore(const nlohmann::json& state) override;

 private:
  int64_t vocab_size_, seq_length_, batch_size_;
  uint64_t seed_;
  int64_t batches_ = 0;
};

// Fisher-Yates over 0..n-1 with a 64-bit Mersenne Twister: the same order on every platform
// (std::shuffle's algorithm is implementation-defined).
std::vector<int64_t> permutation(int64_t n, uint64_t seed);

}  // namespace bpt::data
