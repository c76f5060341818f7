// The LLaMA model and its config from C++: presets and overrides, cached decoding against full
// recomputation, tied embeddings, and the sampler.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include "csrc/common/error.h"
#include "csrc/generate/generate.h"
#include "csrc/generate/sampling.h"
#include "helpers.h"
#include "models/llama/config.h"
#include "models/llama/hf_names.h"
#include "models/llama/llama.h"

namespace {

using bpt::models::llama::LlamaConfig;
using bpt::models::llama::LlamaForCausalLM;
using Catch::Contains;

LlamaConfig tiny() {
  LlamaConfig config = bpt::models::llama::preset("tiny");
  config.q_chunk_size = 4;
  config.k_chunk_size = 8;
  config.ffn_chunk_size = 5;
  config.loss_chunk_size = 7;
  return config;
}

}  // namespace

TEST_CASE("presets carry the published sizes", "[llama][config]") {
  const LlamaConfig llama3 = bpt::models::llama::preset("llama3-8b");
  REQUIRE(llama3.vocab_size == 128256);
  REQUIRE(llama3.rope_theta == 500000.0);
  REQUIRE(llama3.num_key_value_heads == 8);
  const LlamaConfig llama2 = bpt::models::llama::preset("llama2-70b");
  REQUIRE((llama2.hidden_size == 8192 && llama2.num_attention_heads == 64 && llama2.num_key_value_heads == 8));
  for (const std::string& name : bpt::models::llama::preset_names()) REQUIRE_NOTHROW(bpt::models::llama::preset(name).validate());
  REQUIRE_THROWS_WITH(bpt::models::llama::preset("7B"), Contains("did you mean '7b'"));
}

TEST_CASE("config fields are set by name, and bad names or values are named", "[llama][config]") {
  LlamaConfig config = tiny();
  config.update("q_chunk_size=512, float32_logits=false,dtype=bf16,rope_scaling.type=llama3,eos_token_ids=2,3");
  REQUIRE(config.q_chunk_size == 512);
  REQUIRE_FALSE(config.float32_logits);
  REQUIRE(config.dtype == at::kBFloat16);
  REQUIRE(config.rope_scaling.type() == "llama3");
  REQUIRE(config.eos_token_ids == std::vector<int64_t>{2, 3});
  config.set("eos_token_ids", "[128001, 128009]");
  REQUIRE(config.eos_token_ids == std::vector<int64_t>{128001, 128009});
  REQUIRE_THROWS_WITH(config.set("q_chunk_sise", "4"), Contains("did you mean 'q_chunk_size'"));
  REQUIRE_THROWS_WITH(config.set("k_chunk_size", "x"), Contains("k_chunk_size: expected an integer, got 'x'"));
  config.set("k_chunk_size", "0");
  REQUIRE_THROWS_AS(config.validate(), bpt::InputError);
}

TEST_CASE("config.json written and read back gives the same config", "[llama][config]") {
  LlamaConfig config = tiny();
  config.update("rope_scaling.type=llama3,rope_scaling.factor=8,tie_word_embeddings=true,remat_policy=checkpoint_dots");
  const nlohmann::json json = bpt::models::llama::to_hf_json(config);
  REQUIRE(json["rope_parameters"]["rope_type"] == "llama3");
  REQUIRE(bpt::models::llama::from_hf_json(json, "config.json").fields() == config.fields());
  nlohmann::json bad = json;
  bad["vocab_size"] = "many";
  REQUIRE_THROWS_WITH(bpt::models::llama::from_hf_json(bad, "x/config.json"),
                      Contains("x/config.json: field 'vocab_size'"));
}

TEST_CASE("parameter names are Hugging Face's, with shapes from the config", "[llama]") {
  const LlamaConfig config = tiny();
  const LlamaForCausalLM model(config);
  const auto expected = bpt::models::llama::hf_tensor_shapes(config);
  const auto named = model->named_parameters();
  REQUIRE(named.size() == expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    REQUIRE(bpt::models::llama::hf_name(named[i].key()) == expected[i].first);
    REQUIRE(named[i].value().sizes().vec() == expected[i].second);
  }
}

TEST_CASE("tied embeddings share one tensor and the head owns no parameter", "[llama]") {
  LlamaConfig config = tiny();
  config.tie_word_embeddings = true;
  const LlamaForCausalLM model(config);
  REQUIRE(model->lm_head->weight.is_same(model->model->embed_tokens->weight));
  REQUIRE_FALSE(model->named_parameters().contains("lm_head.weight"));
}

TEST_CASE("decoding with the KV cache equals recomputing the whole sequence", "[llama][generate]") {
  LlamaForCausalLM model(tiny());
  at::NoGradGuard no_grad;
  const at::Tensor ids = at::randint(0, 256, {2, 12}, at::kLong);
  const at::Tensor full = model->logits(ids);  // [2, 12, vocab]

  auto cache = model->make_cache(2, 16);
  std::vector<at::Tensor> pieces = {model->logits(ids.narrow(1, 0, 7), std::nullopt, std::nullopt, &cache)};
  for (int64_t t = 7; t < 12; ++t) pieces.push_back(model->logits(ids.narrow(1, t, 1), std::nullopt, std::nullopt, &cache));
  REQUIRE(cache.length == 12);
  bpt::test::require_close(at::cat(pieces, 1), full, 1e-5, 1e-5);
  REQUIRE_THROWS_WITH(model->logits(ids.narrow(1, 0, 5), std::nullopt, std::nullopt, &cache),
                      Contains("exceed the cache's capacity of 16"));
}

TEST_CASE("position ids restart at each document of the segment ids", "[llama]") {
  const at::Tensor segments = at::tensor({1, 1, 1, 2, 2, 5, 5, 5, 5}, at::kLong).view({1, 9});
  const at::Tensor positions = bpt::models::llama::positions_from_segments(segments);
  REQUIRE(at::equal(positions, at::tensor({0, 1, 2, 0, 1, 0, 1, 2, 3}, at::kLong).view({1, 9})));
}

TEST_CASE("token ids outside the vocabulary are refused", "[llama]") {
  LlamaForCausalLM model(tiny());
  REQUIRE_THROWS_WITH(model->logits(at::full({1, 3}, 256, at::kLong)), Contains("outside the vocabulary [0, 256)"));
}

TEST_CASE("a bf16 model's loss is close to the fp32 model's", "[llama]") {
  LlamaConfig config = tiny();
  at::manual_seed(0);
  LlamaForCausalLM fp32(config);
  config.dtype = at::kBFloat16;
  at::manual_seed(0);
  LlamaForCausalLM bf16(config);
  const at::Tensor ids = at::randint(0, 256, {2, 24}, at::kLong);
  const double want = fp32->forward(ids, ids).loss.item<double>();
  const at::Tensor got = bf16->forward(ids, ids).loss;
  got.backward();
  REQUIRE(bf16->model->embed_tokens->weight.grad().scalar_type() == at::kBFloat16);
  REQUIRE(std::abs(got.item<double>() - want) < 0.02);
}

TEST_CASE("the sampler: greedy, repetition penalty, top-k, top-p and temperature", "[generate]") {
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(0);
  bpt::generate::SamplingOptions greedy;
  const at::Tensor logits = at::tensor({2.0f, 1.9f, -1.0f, 0.5f});
  REQUIRE(bpt::generate::next_token(logits, {}, greedy, generator) == 0);

  // CTRL's penalty: a seen positive logit is divided, a seen negative one multiplied.
  bpt::generate::SamplingOptions penalised;
  penalised.repetition_penalty = 2.0;
  REQUIRE(bpt::generate::next_token(logits, {0, 0}, penalised, generator) == 1);
  REQUIRE(bpt::generate::next_token(at::tensor({-1.0f, -1.5f}), {0}, penalised, generator) == 1);

  bpt::generate::SamplingOptions sample;
  sample.do_sample = true;
  sample.top_k = 1;
  for (int i = 0; i < 20; ++i) REQUIRE(bpt::generate::next_token(logits, {}, sample, generator) == 0);
  sample.top_k = 0;
  sample.top_p = 0.3;  // the most likely token alone holds more than 0.3
  for (int i = 0; i < 20; ++i) REQUIRE(bpt::generate::next_token(logits, {}, sample, generator) == 0);

  // Draw frequencies follow softmax(logits / temperature).
  sample.top_p = 1.0;
  sample.temperature = 2.0;
  const at::Tensor probs = (logits / 2.0).softmax(0);
  std::vector<double> counts(4, 0.0);
  const int draws = 4000;
  for (int i = 0; i < draws; ++i) counts[bpt::generate::next_token(logits, {}, sample, generator)] += 1;
  for (int v = 0; v < 4; ++v) REQUIRE(std::abs(counts[v] / draws - probs[v].item<double>()) < 0.03);

  sample.top_p = 1.5;
  REQUIRE_THROWS_WITH(bpt::generate::validate(sample), Contains("top_p: expected in (0, 1]"));
}
