// nn::LoRALinear: a fresh adapter changes nothing; only the adapter learns; the output is the
// base plus (alpha / r) B A x, which merging into the base weight reproduces.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <torch/nn/modules/linear.h>

#include "csrc/nn/bit_linear.h"
#include "csrc/nn/lora_linear.h"
#include "helpers.h"

using bpt::nn::LoRALinear;
using bpt::nn::LoRAOptions;

TEST_CASE("LoRALinear: base + (alpha / r) B A x, only the adapter trains, names as peft's", "[lora]") {
  at::manual_seed(0);
  torch::nn::Linear base(torch::nn::LinearOptions(24, 10).bias(false));
  const at::Tensor base_weight = base->weight.detach().clone();
  LoRALinear lora(torch::nn::AnyModule(base), 24, 10, LoRAOptions().rank(4).alpha(8));
  std::vector<std::string> names;
  for (const auto& item : lora->named_parameters()) names.push_back(item.key());
  CHECK((names == std::vector<std::string>{"weight", "lora_A.weight", "lora_B.weight"}));

  const at::Tensor x = at::randn({3, 7, 24});
  bpt::test::require_close(lora(x), at::matmul(x, base_weight.t()), 0, 0);  // B starts at zero
  {
    at::NoGradGuard no_grad;
    lora->lora_B->weight.normal_();
  }
  const at::Tensor want = at::matmul(x, (base_weight + 2.0 * at::mm(lora->lora_B->weight, lora->lora_A->weight)).t());
  bpt::test::require_close(lora(x), want, 1e-5, 1e-5);
  bpt::test::require_close(lora->delta_weight(), 2.0 * at::mm(lora->lora_B->weight, lora->lora_A->weight), 0, 0);

  lora(x).sum().backward();
  CHECK(!base->weight.requires_grad());
  CHECK(!base->weight.grad().defined());
  CHECK(lora->lora_A->weight.grad().defined());
  CHECK(lora->lora_B->weight.grad().defined());
}

TEST_CASE("LoRALinear over a BitLinear keeps the base's norm and weight names, frozen", "[lora]") {
  at::manual_seed(1);
  bpt::nn::BitLinear base(bpt::nn::BitLinearOptions(16, 8));
  LoRALinear lora(torch::nn::AnyModule(base), 16, 8, LoRAOptions().rank(2));
  std::vector<std::string> trainable, frozen;
  for (const auto& item : lora->named_parameters()) {
    (item.value().requires_grad() ? trainable : frozen).push_back(item.key());
  }
  CHECK((frozen == std::vector<std::string>{"weight", "norm.weight"}));
  CHECK((trainable == std::vector<std::string>{"lora_A.weight", "lora_B.weight"}));
  const at::Tensor x = at::randn({5, 16});
  bpt::test::require_close(lora(x), base(x), 0, 0);
  CHECK_THROWS_WITH(LoRALinear(torch::nn::AnyModule(base), 16, 8, LoRAOptions().rank(0)),
                    Catch::Contains("rank must be positive"));
}
