#pragma once
// Autoregressive generation from a causal LM: feed the prompt, then one token at a time,
// each chosen by next_token (sampling.h), until max_new_tokens or an end-of-sequence id.
// With the KV cache a step costs one token's forward; without it, the whole sequence is
// recomputed each step (the reference the cached path is tested against).
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "csrc/generate/sampling.h"
#include "models/llama/llama.h"

namespace bpt::generate {

// What generation needs from a model.
class Decoder {
 public:
  virtual ~Decoder() = default;
  // Appends `ids` to the sequence and returns the logits [vocab] of the token after it.
  virtual at::Tensor feed(const std::vector<int64_t>& ids) = 0;
  // Starts a new sequence of at most `capacity` tokens.
  virtual void reset(int64_t capacity) = 0;
};

// A LLaMA decoder, with a KV cache or recomputing everything each step.
std::unique_ptr<Decoder> llama_decoder(models::llama::LlamaForCausalLM model, bool use_cache);

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplingOptions sampling;
  std::vector<int64_t> eos_ids;  // stop after producing any of these
  uint64_t seed = 0;

  bool is_eos(int64_t id) const { return std::find(eos_ids.begin(), eos_ids.end(), id) != eos_ids.end(); }
};

// Generates after `prompt` (non-empty); calls `on_token` with each new id as it is chosen.
// Returns the new ids (the end-of-sequence id included, if one stopped generation).
std::vector<int64_t> generate(Decoder& decoder, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                              const std::function<void(int64_t)>& on_token = {});

}  // namespace bpt::generate
