#pragma once
// The LM head and its cross-entropy over bpt::chunked_lm_loss: training never builds the
// [tokens, vocab] logits. `weight` is Hugging Face's lm_head.weight [vocab, dim]; a model with
// tied embeddings points it at the embedding table.

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

namespace bpt::nn {

struct ChunkedLMHeadLossOptions {
  ChunkedLMHeadLossOptions(int64_t dim, int64_t vocab_size) : dim_(dim), vocab_size_(vocab_size) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, vocab_size);
  // Tokens per chunk (llamabpt's loss_chunk_size); -1: no chunking.
  TORCH_ARG(int64_t, chunk) = 1024;
  TORCH_ARG(int64_t, ignore_index) = -100;
  // Weight of the z-loss, mean(logsumexp^2) (PaLM); 0 disables it.
  TORCH_ARG(double, z_loss) = 0.0;
  // Softmax over fp32 logits for bf16/fp16 models (llamabpt's float32_logits).
  TORCH_ARG(bool, float32_logits) = true;
};

struct LMLoss {
  at::Tensor loss;       // scalar, mean over counted tokens
  at::Tensor n_tokens;   // int64 scalar: targets != ignore_index
  at::Tensor n_correct;  // int64 scalar: argmax == target among those
};

class ChunkedLMHeadLossImpl : public torch::nn::Cloneable<ChunkedLMHeadLossImpl> {
 public:
  ChunkedLMHeadLossImpl(int64_t dim, int64_t vocab_size)
      : ChunkedLMHeadLossImpl(ChunkedLMHeadLossOptions(dim, vocab_size)) {}
  explicit ChunkedLMHeadLossImpl(const ChunkedLMHeadLossOptions& options_);

  void reset() override;
  // weight ~ N(0, 0.02), as Hugging Face initialises LLaMA.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  // h [..., dim], targets [...] -> loss over targets != ignore_index.
  LMLoss forward(const at::Tensor& h, const at::Tensor& targets);
  // h [..., dim] -> logits [..., vocab] (inference: materialises them).
  at::Tensor logits(const at::Tensor& h) const;

  // Tied embeddings: use `embedding` [vocab_size, dim] as the weight. The head then owns no
  // parameter, so an optimizer sees the shared tensor once, through the embedding.
  void tie(const at::Tensor& embedding);

  ChunkedLMHeadLossOptions options;
  at::Tensor weight;  // [vocab_size, dim]
};

TORCH_MODULE(ChunkedLMHeadLoss);

}  // namespace bpt::nn
