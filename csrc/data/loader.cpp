#include "csrc/data/loader.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <exception>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <thread>

#include "csrc/common/error.h"

namespace bpt::data {

std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::mt19937_64 random(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    // Rejection sampling: a draw uniform in [0, i] with no modulo bias.
    const uint64_t range = static_cast<uint64_t>(i) + 1, limit = UINT64_MAX - UINT64_MAX % range;
    uint64_t draw;
    do draw = random(); while (draw >= limit);
    std::swap(order[i], order[draw % range]);
  }
  return order;
}

PackedLoader::PackedLoader(std::shared_ptr<const JsonlCorpus> corpus, std::shared_ptr<const TextProcessor> processor,
                           PackingOptions options)
    : corpus_(std::move(corpus)), processor_(std::move(processor)), options_(options) {
  if (options_.seq_length < 1) throw_input_error("json_dataset.seq_length: expected >= 1, got {}", options_.seq_length);
  if (options_.batch_size < 1) throw_input_error("json_dataset.batch_size: expected >= 1, got {}", options_.batch_size);
  if (options_.tokenizer_threads < 1) {
    throw_input_error("json_dataset.tokenizer_processes: expected >= 1, got {}", options_.tokenizer_threads);
  }
  start_epoch(0);
}

void PackedLoader::start_epoch(int64_t epoch) {
  epoch_ = epoch;
  position_ = token_ = 0;
  ready_.clear();
  if (options_.shuffle) {
    order_ = permutation(corpus_->size(), options_.seed + 0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(epoch + 1));
  } else {
    order_.resize(static_cast<size_t>(corpus_->size()));
    std::iota(order_.begin(), order_.end(), int64_t{0});
  }
}

const TokenizedDocument& PackedLoader::document(int64_t position) {
  if (auto it = ready_.find(position); it != ready_.end()) return it->second;
  // Tokenize the next stretch of documents, one worker thread per tokenizer thread; results
  // go by position, so the order (and every batch) is the same whatever the thread count.
  const int64_t threads = options_.tokenizer_threads;
  const int64_t end = std::min<int64_t>(position + 32 * threads, static_cast<int64_t>(order_.size()));
  std::vector<TokenizedDocument> docs(static_cast<size_t>(end - position));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  std::vector<std::thread> workers;
  for (int64_t w = 0; w < threads; ++w) {
    workers.emplace_back([&, w] {
      try {
        for (int64_t p = position + w; p < end; p += threads) {
          const int64_t index = order_[static_cast<size_t>(p)];
          docs[p - position] = (*processor_)(corpus_->document(index), corpus_->where(index));
        }
      } catch (...) {
        errors[w] = std::current_exception();
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  for (const std::exception_ptr& error : errors) {
    if (error) std::rethrow_exception(error);
  }
  for (int64_t p = position; p < end; ++p) ready_[p] = std::move(docs[p - position]);
  return ready_.at(position);
}

Batch PackedLoader::next() {
  const int64_t B = options_.batch_size, T = options_.seq_length;
  std::vector<int64_t> inputs(B * T), targets(B * T), segments(B * T);
  int64_t empty_run = 0;  // documents in a row with no tokens: a corpus of only those would spin
  for (int64_t row = 0; row < B; ++row) {
    int64_t segment = 0, last_position = -1;
    for (int64_t t = 0; t < T;) {
      if (position_ == static_cast<int64_t>(order_.size())) start_epoch(epoch_ + 1);
      const TokenizedDocument& doc = document(position_);
      const int64_t n = static_cast<int64_t>(doc.tokens.size());
      if (token_ >= n) {
        ready_.erase(position_);
        ++position_;
        token_ = 0;
        if (n == 0 && ++empty_run > corpus_->size()) throw InputError("dataset: every document tokenizes to nothing");
        continue;
      }
      empty_run = 0;
      if (position_ != last_position || token_ == 0) {  // a new document (or the same one again)
        ++segment;
        last_position = position_;
      }
      const int64_t i = row * T + t;
      inputs[i] = doc.tokens[token_];
      targets[i] = token_ + 1 < n && doc.loss_mask[token_ + 1] ? doc.tokens[token_ + 1] : -100;
      segments[i] = segment;
      ++token_;
      ++t;
    }
  }
  const auto as_tensor = [&](std::vector<int64_t>& values) { return at::tensor(values, at::kLong).view({B, T}); };
  return {as_tensor(inputs), as_tensor(targets), as_tensor(segments)};
}

nlohmann::json PackedLoader::state() const {
  return {{"epoch", epoch_}, {"document", position_}, {"token", token_}};
}

void PackedLoader::restore(const nlohmann::json& state) {
  const auto count = [&](const char* key) -> int64_t {
    if (!state.is_object() || !state.contains(key) || !state[key].is_number_integer() || state[key].get<int64_t>() < 0) {
      throw_input_error("dataset state {}: expected {{\"epoch\", \"document\", \"token\"}} counts of a JSON dataset",
                        state.dump());
    }
    return state[key].get<int64_t>();
  };
  const int64_t epoch = count("epoch"), document = count("document"), token = count("token");
  start_epoch(epoch);
  if (document > static_cast<int64_t>(order_.size())) {
    throw_input_error("dataset state: document {} outside this dataset's {} documents", document, order_.size());
  }
  position_ = document;
  token_ = token;
}

SyntheticLoader::SyntheticLoader(int64_t vocab_size, int64_t seq_length, int64_t batch_size, uint64_t seed)
    : vocab_size_(vocab_size), seq_length_(seq_length), batch_size_(batch_size), seed_(seed) {
  if (seq_length < 1 || batch_size < 1) {
    throw_input_error("synthetic dataset: seq_length and batch_size must be >= 1, got {} and {}", seq_length, batch_size);
  }
}

Batch SyntheticLoader::next() {
  // Each batch from its own seed: restoring the count replays the same batches.
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed_ + static_cast<uint64_t>(batches_++));
  const at::Tensor tokens = at::randint(vocab_size_, {batch_size_, seq_length_ + 1}, generator, at::kLong);
  return {tokens.narrow(1, 0, seq_length_).contiguous(), tokens.narrow(1, 1, seq_length_).contiguous(),
          at::ones({batch_size_, seq_length_}, at::kLong)};
}

nlohmann::json SyntheticLoader::state() const { return {{"synthetic_batches", batches_}}; }

void SyntheticLoader::restore(const nlohmann::json& state) {
  if (!state.is_object() || !state.contains("synthetic_batches") || !state["synthetic_batches"].is_number_integer()) {
    throw_input_error("dataset state {}: expected {{\"synthetic_batches\"}} of a synthetic dataset", state.dump());
  }
  batches_ = state["synthetic_batches"].get<int64_t>();
}

}  // namespace bpt::data
