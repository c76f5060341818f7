#include "csrc/generate/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

#include "csrc/common/error.h"

namespace bpt::generate {
namespace {

using models::llama::LlamaForCausalLM;

class CachedLlamaDecoder : public Decoder {
 public:
  explicit CachedLlamaDecoder(LlamaForCausalLM model) : model_(std::move(model)) {}

  void reset(int64_t capacity) override { cache_ = model_->make_cache(1, capacity); }

  at::Tensor feed(const std::vector<int64_t>& ids) override {
    const at::Tensor input = at::tensor(ids, at::kLong).unsqueeze(0).to(model_->lm_head->weight.device());
    return model_->logits(input, std::nullopt, std::nullopt, &cache_, /*last_only=*/true).flatten();
  }

 private:
  LlamaForCausalLM model_;
  models::llama::KVCache cache_;
};

class RecomputingLlamaDecoder : public Decoder {
 public:
  explicit RecomputingLlamaDecoder(LlamaForCausalLM model) : model_(std::move(model)) {}

  void reset(int64_t /*capacity*/) override { sequence_.clear(); }

  at::Tensor feed(const std::vector<int64_t>& ids) override {
    sequence_.insert(sequence_.end(), ids.begin(), ids.end());
    const at::Tensor input = at::tensor(sequence_, at::kLong).unsqueeze(0).to(model_->lm_head->weight.device());
    return model_->logits(input, std::nullopt, std::nullopt, nullptr, /*last_only=*/true).flatten();
  }

 private:
  LlamaForCausalLM model_;
  std::vector<int64_t> sequence_;
};

}  // namespace

std::unique_ptr<Decoder> llama_decoder(LlamaForCausalLM model, bool use_cache) {
  if (use_cache) return std::make_unique<CachedLlamaDecoder>(std::move(model));
  return std::make_unique<RecomputingLlamaDecoder>(std::move(model));
}

std::vector<int64_t> generate(Decoder& decoder, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                              const std::function<void(int64_t)>& on_token) {
  if (prompt.empty()) throw_input_error("generate: the prompt has no tokens");
  if (options.max_new_tokens < 0) throw_input_error("max_new_tokens: expected >= 0, got {}", options.max_new_tokens);
  validate(options.sampling);
  at::NoGradGuard no_grad;
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);

  decoder.reset(static_cast<int64_t>(prompt.size()) + std::max<int64_t>(options.max_new_tokens, 1));
  std::vector<int64_t> context = prompt, generated;
  at::Tensor logits = decoder.feed(prompt);
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    const int64_t id = next_token(logits, context, options.sampling, generator);
    generated.push_back(id);
    context.push_back(id);
    if (on_token) on_token(id);
    if (options.is_eos(id)) break;
    if (step + 1 < options.max_new_tokens) logits = decoder.feed({id});
  }
  return generated;
}

}  // namespace bpt::generate
