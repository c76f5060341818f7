#pragma once
// Choosing the next token from logits in the order of Hugging Face's generate: the repetition
// penalty first (CTRL: a seen token's logit divided by the penalty if positive, multiplied if
// negative), then, when sampling, temperature, top-k and top-p (nucleus) filtering and a draw;
// otherwise the argmax (greedy).
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace bpt::generate {

struct SamplingOptions {
  bool do_sample = false;           // false: greedy
  double temperature = 1.0;         // > 0
  int64_t top_k = 0;                // 0: no top-k filter
  double top_p = 1.0;               // 1: no nucleus filter
  double repetition_penalty = 1.0;  // 1: none
  int64_t vocab_limit = 0;          // > 0: never choose an id >= this (a tokenizer smaller than the model's vocab)
};

// Throws InputError naming the option that is out of range.
void validate(const SamplingOptions& options);

// logits [vocab] (any float dtype), context: the ids so far (prompt and generated) -> next id.
int64_t next_token(const at::Tensor& logits, const std::vector<int64_t>& context, const SamplingOptions& options,
                   at::Generator& generator);

}  // namespace bpt::generate
