#include "csrc/generate/sampling.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "csrc/common/error.h"

namespace bpt::generate {

void validate(const SamplingOptions& options) {
  if (!(options.temperature > 0)) throw_input_error("temperature: expected > 0, got {}", options.temperature);
  if (options.top_k < 0) throw_input_error("top_k: expected >= 0 (0: off), got {}", options.top_k);
  if (!(options.top_p > 0 && options.top_p <= 1)) throw_input_error("top_p: expected in (0, 1], got {}", options.top_p);
  if (!(options.repetition_penalty > 0)) {
    throw_input_error("repetition_penalty: expected > 0 (1: off), got {}", options.repetition_penalty);
  }
}

int64_t next_token(const at::Tensor& logits, const std::vector<int64_t>& context, const SamplingOptions& options,
                   at::Generator& generator) {
  at::Tensor scores = logits.detach().to(at::kCPU, at::kFloat).flatten().clone();  // [vocab]
  if (options.vocab_limit > 0 && options.vocab_limit < scores.numel()) {
    scores.narrow(0, options.vocab_limit, scores.numel() - options.vocab_limit).fill_(-INFINITY);
  }
  if (options.repetition_penalty != 1.0 && !context.empty()) {
    std::vector<int64_t> ids = context;
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    const at::Tensor seen = at::tensor(ids, at::kLong);
    const at::Tensor values = scores.index_select(0, seen);
    scores.index_copy_(0, seen, at::where(values < 0, values * options.repetition_penalty,
                                          values / options.repetition_penalty));
  }
  if (!options.do_sample) return scores.argmax().item<int64_t>();

  scores = scores / options.temperature;
  const double masked = -std::numeric_limits<double>::infinity();
  if (options.top_k > 0 && options.top_k < scores.numel()) {
    const at::Tensor kth = std::get<0>(scores.topk(options.top_k)).select(0, options.top_k - 1);
    scores.masked_fill_(scores < kth, masked);
  }
  if (options.top_p < 1.0) {
    // Drop the low tail whose mass is at most 1 - top_p; the most likely token always stays.
    const auto [sorted, order] = scores.sort(/*dim=*/0, /*descending=*/false);
    const at::Tensor tail = sorted.softmax(0).cumsum(0) <= (1.0 - options.top_p);
    tail.select(0, tail.numel() - 1).fill_(false);
    scores.index_put_({order.masked_select(tail)}, masked);
  }
  return at::multinomial(scores.softmax(0), 1, /*replacement=*/false, generator).item<int64_t>();
}

}  // namespace bpt::generate
