// nn::BitLinear: its parts (the input RMSNorm, the fake-quantized linear), gradients to both
// parameters, and the packed inference path against the fake-quantized one.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include "csrc/nn/bit_linear.h"
#include "csrc/ops/ops.h"
#include "helpers.h"
#include "models/llama/hf_names.h"
#include "models/llama/llama.h"

using bpt::nn::BitLinear;
using bpt::nn::BitLinearOptions;

TEST_CASE("BitLinear is the input RMSNorm followed by the fake-quantized linear", "[bitlinear]") {
  at::manual_seed(0);
  BitLinear layer(BitLinearOptions(37, 11));
  std::vector<std::string> names;
  for (const auto& item : layer->named_parameters()) names.push_back(item.key());
  CHECK((names == std::vector<std::string>{"weight", "norm.weight"}));
  {
    at::NoGradGuard no_grad;
    layer->norm->weight.uniform_(0.5, 1.5);
  }
  const at::Tensor x = at::randn({3, 5, 37});
  const at::Tensor want = bpt::ops::bitlinear(bpt::ops::rms_norm(x, layer->norm->weight, 1e-6), layer->weight);
  bpt::test::require_close(layer(x), want, 0, 0);
  layer(x).sum().backward();
  CHECK(layer->weight.grad().abs().sum().item<double>() > 0);
  CHECK(layer->norm->weight.grad().abs().sum().item<double>() > 0);
}

TEST_CASE("a quantized BitLinear gives the fake-quantized output from 2-bit weights", "[bitlinear]") {
  at::manual_seed(1);
  for (const int64_t in : {1, 5, 64, 127, 1000}) {
    INFO("in_features " << in);
    BitLinear layer(BitLinearOptions(in, 19));
    const at::Tensor x = at::randn({4, in});
    at::Tensor fake;
    {
      at::NoGradGuard no_grad;
      fake = layer(x);
    }
    const int64_t fp32_bytes = layer->weight.nbytes();
    layer->quantize();
    REQUIRE(layer->quantized());
    CHECK(layer->named_parameters().size() == 1);  // norm.weight alone: the fp32 weights are gone
    CHECK(layer->named_buffers().size() == 2);
    CHECK(layer->weight_packed.nbytes() * 8 <= fp32_bytes + 8 * 19 * 3);  // 16x smaller, padding aside
    const at::Tensor packed_out = layer(x);
    const double scale = fake.abs().max().item<double>();
    CHECK((packed_out - fake).abs().max().item<double>() <= 1e-4 * std::max(scale, 1e-6));
  }
  BitLinear layer(BitLinearOptions(8, 3));
  CHECK_THROWS_WITH(layer->load_quantized(at::zeros({3, 3}, at::kByte), at::ones({}, at::kFloat)),
                    Catch::Contains("uint8 [3, 2]"));
  CHECK_THROWS_WITH(layer->load_quantized(at::zeros({3, 2}, at::kByte), at::ones({2}, at::kFloat)),
                    Catch::Contains("one fp32 value"));
}

TEST_CASE("bLLaMA presets and a quantized model built without full-precision weights", "[bitlinear]") {
  const auto big = bpt::models::llama::preset("bllama-1.7b");
  REQUIRE(big.bitlinear);
  double count = 0;
  for (const auto& [name, shape] : bpt::models::llama::hf_tensor_shapes(big)) {
    double n = 1;
    for (const int64_t d : shape) n *= static_cast<double>(d);
    count += n;
  }
  CHECK(count == Approx(1.742e9).epsilon(0.001));  // the seed's 1.7B

  auto config = bpt::models::llama::preset("bllama-tiny");
  config.quantization = "ternary";
  bpt::models::llama::LlamaForCausalLM model(config);
  int64_t matrices = 0;
  for (const auto& item : model->named_parameters()) matrices += item.value().dim() == 2;
  CHECK(matrices == 2);  // the embedding and the head: no BitLinear weight was ever made
  CHECK(model->named_buffers().contains("model.layers.0.mlp.down_proj.weight_packed"));
  CHECK(model->unquantized_bitlinear_layers() == 0);
}
