// The Trainer's loop against hand-computed values: gradient accumulation averages the
// micro-batches, the logged learning rate follows the schedule, a non-finite step is skipped.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "csrc/train/trainer.h"

namespace {

namespace fs = std::filesystem;

// Batches whose first four input ids are 1,2,3,4 then 5,6,7,8, ...; the step-th batch may be NaN.
class CountingLoader : public bpt::data::DataLoader {
 public:
  bpt::data::Batch next() override {
    const at::Tensor ids = at::arange(4 * count_ + 1, 4 * count_ + 5, at::kLong).view({1, 4});
    ++count_;
    return {ids, ids, at::ones({1, 4}, at::kLong)};
  }
  nlohmann::json state() const override { return {{"count", count_}}; }
  void restore(const nlohmann::json& state) override { count_ = state["count"].get<int64_t>(); }

 private:
  int64_t count_ = 0;
};

// loss = w . x, so d loss / d w = x (the batch's ids as floats); NaN on the batch listed.
struct Linear : bpt::train::TrainModule {
  at::Tensor w = at::zeros({4}).requires_grad_();
  int64_t nan_batch = -1, seen = 0;
  bpt::train::StepOutput training_step(const bpt::data::Batch& batch) override {
    at::Tensor x = batch.input_ids.flatten().to(at::kFloat);
    if (seen++ == nan_batch) x = x * NAN;
    return {(w * x).sum(), 4};
  }
  std::vector<std::pair<std::string, at::Tensor>> named_parameters() override { return {{"w", w}}; }
  void save(const std::string&) const override {}
  void load(const std::string&) override {}
};

std::vector<nlohmann::json> run(Linear& model, bpt::train::TrainerOptions options, bpt::train::AdamWOptions adamw) {
  const fs::path dir = fs::temp_directory_path() / ("bpt_test_trainer_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  options.output_dir = dir.string();
  options.log_freq = 1;
  options.progress = "never";
  CountingLoader data;
  bpt::train::Trainer(options, adamw).fit(model, data);
  std::vector<nlohmann::json> records;
  std::ifstream stream(dir / "metrics.jsonl");
  for (std::string line; std::getline(stream, line);) records.push_back(nlohmann::json::parse(line));
  fs::remove_all(dir);
  return records;
}

}  // namespace

TEST_CASE("accumulated micro-batches give their mean gradient; the lr follows the schedule", "[trainer]") {
  Linear model;
  bpt::train::TrainerOptions options;
  options.total_steps = 3;
  options.accumulate_gradient_steps = 2;
  bpt::train::AdamWOptions adamw;
  adamw.lr = 0.1;
  adamw.end_lr = 0.0;
  adamw.lr_warmup_steps = 2;
  adamw.lr_decay_steps = 4;
  adamw.clip_gradient = 0;
  const auto records = run(model, options, adamw);
  REQUIRE(records.size() == 3);
  // Step 1 sees ids 1..4 and 5..8: mean gradient (3, 4, 5, 6), norm sqrt(86).
  REQUIRE(records[0]["grad_norm"].get<double>() == Approx(std::sqrt(86.0)));
  // Step 2: 9..12 and 13..16, mean (11, 12, 13, 14).
  REQUIRE(records[1]["grad_norm"].get<double>() == Approx(std::sqrt(121.0 + 144 + 169 + 196)));
  // lr of updates 0, 1, 2: warm-up 0, 0.05, then the cosine from 0.1 at update 2.
  REQUIRE(records[0]["lr"].get<double>() == Approx(0.0));
  REQUIRE(records[1]["lr"].get<double>() == Approx(0.05));
  REQUIRE(records[2]["lr"].get<double>() == Approx(0.1));
}

TEST_CASE("a step with a non-finite loss is skipped and counted", "[trainer]") {
  Linear model;
  model.nan_batch = 1;
  bpt::train::TrainerOptions options;
  options.total_steps = 3;
  bpt::train::AdamWOptions adamw;
  adamw.lr = 0.1;
  adamw.end_lr = 0.1;
  const auto records = run(model, options, adamw);
  REQUIRE(records[0]["skipped_steps"] == 0);
  REQUIRE(records[1]["skipped_steps"] == 1);
  REQUIRE(records[2]["skipped_steps"] == 1);
  REQUIRE(at::isfinite(model.w).all().item<bool>());
}
