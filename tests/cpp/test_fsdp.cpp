// FSDP pieces that need no second process: the mesh spec, the launch environment, the
// wrapper over a world of one against the plain model, and the sharded checkpoint format.
// Several processes: tests/python/test_distributed.py.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>

#include <cstdlib>
#include <filesystem>

#include "csrc/common/error.h"
#include "csrc/dist/fsdp.h"
#include "csrc/dist/process_group.h"
#include "csrc/io/sharded_checkpoint.h"
#include "csrc/train/llama_module.h"
#include "helpers.h"

namespace {

namespace fs = std::filesystem;
using bpt::dist::parse_mesh_dim;

// Sets environment variables for one test, and puts the old values back.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> values) {
    for (const char* name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) {
      const char* old = std::getenv(name);
      saved_.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
      ::unsetenv(name);
    }
    for (const auto& [name, value] : values) ::setenv(name, value, 1);
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) {
      if (value) ::setenv(name.c_str(), value->c_str(), 1);
      else ::unsetenv(name.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

bpt::train::LlamaModule tiny_module(bpt::train::RematPolicy policy) {
  auto config = bpt::models::llama::preset("tiny");
  config.q_chunk_size = config.k_chunk_size = 8;
  at::manual_seed(0);
  return bpt::train::LlamaModule(bpt::models::llama::LlamaForCausalLM(config), policy);
}

bpt::data::Batch tiny_batch() {
  at::manual_seed(1);
  const at::Tensor ids = at::randint(0, 256, {2, 20}, at::kLong);
  return {ids, ids.roll(-1, 1), at::cat({at::ones({2, 12}, at::kLong), at::full({2, 8}, 2, at::kLong)}, 1)};
}

}  // namespace

TEST_CASE("mesh_dim: -1 fills, products must equal the world, tp > 1 is refused", "[dist]") {
  const auto shape = parse_mesh_dim("1,-1,1", 4);
  CHECK((shape.dp == 1 && shape.fsdp == 4 && shape.tp == 1));
  const auto hybrid = parse_mesh_dim("-1,2,1", 8);
  CHECK((hybrid.dp == 4 && hybrid.fsdp == 2));
  CHECK(parse_mesh_dim("2,2,1", 4).dp == 2);
  CHECK_THROWS_WITH(parse_mesh_dim("1,-1", 2), Catch::Contains("expected 'dp,fsdp,tp'"));
  CHECK_THROWS_WITH(parse_mesh_dim("-1,-1,1", 2), Catch::Contains("at most one -1"));
  CHECK_THROWS_WITH(parse_mesh_dim("3,-1,1", 4), Catch::Contains("do not divide"));
  CHECK_THROWS_WITH(parse_mesh_dim("1,3,1", 4), Catch::Contains("WORLD_SIZE"));
  CHECK_THROWS_WITH(parse_mesh_dim("1,1,2", 2), Catch::Contains("not supported yet"));
  CHECK_THROWS_WITH(parse_mesh_dim("1,0,1", 1), Catch::Contains(">= 1 or -1"));
}

TEST_CASE("launch environment: none is a world of one; partial or bad values are named", "[dist]") {
  {
    const ScopedEnv env({});
    const auto launch = bpt::dist::launch_env();
    CHECK((!launch.launched && launch.world_size == 1 && launch.rank == 0));
  }
  {
    const ScopedEnv env({{"RANK", "0"}});
    CHECK_THROWS_WITH(bpt::dist::launch_env(), Catch::Contains("WORLD_SIZE is not"));
  }
  {
    const ScopedEnv env({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "1234"}});
    CHECK_THROWS_WITH(bpt::dist::launch_env(), Catch::Contains("RANK: expected 0..1, got 2"));
  }
  {
    const ScopedEnv env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}});
    CHECK_THROWS_WITH(bpt::dist::launch_env(), Catch::Contains("MASTER_PORT is not set"));
  }
  {
    const ScopedEnv env({{"RANK", "1"}, {"WORLD_SIZE", "two"}});
    CHECK_THROWS_WITH(bpt::dist::launch_env(), Catch::Contains("environment variable WORLD_SIZE"));
  }
  {
    const ScopedEnv env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.1"},
                         {"MASTER_PORT", "29500"}});
    const auto launch = bpt::dist::launch_env();
    CHECK((launch.launched && launch.rank == 1 && launch.world_size == 2 && launch.master_port == 29500));
  }
}

TEST_CASE("FSDP over one rank: the same loss and gradients as the plain model, under every policy", "[dist]") {
  using bpt::train::RematPolicy;
  auto plain = tiny_module(RematPolicy::EverythingSaveable);
  const auto batch = tiny_batch();
  const at::Tensor plain_loss = plain.training_step(batch).loss;
  plain_loss.backward();
  std::map<std::string, at::Tensor> want;
  for (const auto& [name, p] : plain.named_parameters()) want[name] = p.grad().reshape({-1});

  for (const auto policy : {RematPolicy::NothingSaveable, RematPolicy::CheckpointDots, RematPolicy::EverythingSaveable}) {
    auto sharded = tiny_module(policy);
    sharded.shard(bpt::dist::Mesh{});
    REQUIRE(sharded.sharding() != nullptr);
    // Two micro-batches of half the loss each: gradients add up in the shard.
    for (int micro = 0; micro < 2; ++micro) {
      const at::Tensor loss = sharded.training_step(batch).loss;
      bpt::test::require_close(loss, plain_loss, 1e-6, 1e-7);
      (loss * 0.5).backward();
    }
    sharded.finish_backward();
    const auto pieces = sharded.named_parameters();
    REQUIRE(pieces.size() == want.size());
    for (const auto& [name, piece] : pieces) {
      INFO(name);
      REQUIRE(piece.dim() == 1);
      bpt::test::require_close(piece.grad(), want.at(name), 1e-5, 1e-7);
    }
    // The module's own tensors hold nothing between steps.
    for (const auto& item : sharded.model->named_parameters()) CHECK(item.value().numel() == 0);
  }
}

TEST_CASE("sharded checkpoint: pieces from several ranks read back whole; a missing part is refused", "[dist]") {
  const fs::path dir = fs::temp_directory_path() / "bpt_test_sharded";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const at::Tensor weight = at::arange(12, at::kFloat).view({3, 4}), bias = at::arange(5, at::kFloat);
  // Rank 0 holds weight[0:7], rank 1 weight[7:12] and all of bias.
  bpt::io::write_shard_index(dir.string(), 2,
                             {{"w", {3, 4}, {{0, 0, 7}, {1, 7, 5}}}, {"b", {5}, {{1, 0, 5}}}}, {"model", "optimizer"});
  const auto file = [&](const std::string& kind, int rank) { return (dir / bpt::io::shard_file_name(kind, rank, 2)).string(); };
  const at::Tensor flat = weight.reshape({-1});
  bpt::io::save_safetensors(file("model", 0), {{"w", flat.narrow(0, 0, 7)}});
  bpt::io::save_safetensors(file("model", 1), {{"w", flat.narrow(0, 7, 5)}, {"b", bias}});
  bpt::io::save_safetensors(file("optimizer", 0), {{"step", at::tensor({3}, at::kLong)}, {"w.exp_avg", flat.narrow(0, 0, 7) * 2}});
  bpt::io::save_safetensors(file("optimizer", 1), {{"step", at::tensor({3}, at::kLong)}, {"w.exp_avg", flat.narrow(0, 7, 5) * 2}, {"b.exp_avg", bias}});

  const auto model = bpt::io::open_weights(dir.string());
  CHECK(at::equal(model->tensor("w"), weight));
  CHECK(at::equal(model->tensor("b"), bias));
  CHECK((model->info("w").shape == std::vector<int64_t>{3, 4}));
  const auto optimizer = bpt::io::open_optimizer_state(dir.string());
  REQUIRE(optimizer != nullptr);
  CHECK(at::equal(optimizer->tensor("w.exp_avg"), weight * 2));
  CHECK(optimizer->tensor("step").item<int64_t>() == 3);

  fs::remove(file("model", 1));
  CHECK_THROWS_WITH(bpt::io::open_weights(dir.string()), Catch::Contains("lacks a rank's part"));
  bpt::io::save_safetensors(file("model", 1), {{"w", flat.narrow(0, 7, 4)}, {"b", bias}});
  CHECK_THROWS_WITH(bpt::io::open_weights(dir.string()), Catch::Contains("the index expects F32 [5]"));
  bpt::io::write_shard_index(dir.string(), 2, {{"w", {3, 4}, {{0, 0, 7}, {1, 8, 4}}}}, {"model"});
  CHECK_THROWS_WITH(bpt::io::open_weights(dir.string()), Catch::Contains("expected one at offset 7"));
  fs::remove_all(dir);
}
