// Safetensors files and directories: round trips, sharding, and refusing corrupt files.
#include <catch2/catch.hpp>

#include <ATen/ATen.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "csrc/common/error.h"
#include "csrc/io/safetensors.h"

namespace {

namespace fs = std::filesystem;
using bpt::io::NamedTensors;

fs::path scratch_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("bpt_test_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A file with `header` (JSON text) and `data_bytes` zero bytes of data.
void write_raw(const fs::path& path, const std::string& header, size_t data_bytes) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(uint64_t(header.size()) >> (8 * i));
  write_bytes(path, bytes + header + std::string(data_bytes, '\0'));
}

}  // namespace

TEST_CASE("safetensors round-trips every stored dtype and the metadata", "[safetensors]") {
  const fs::path dir = scratch_dir("round_trip");
  NamedTensors tensors;
  for (const auto dtype : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16, at::kLong, at::kInt, at::kShort,
                           at::kChar, at::kByte, at::kBool}) {
    tensors.emplace_back(std::string("t_") + c10::toString(dtype), (at::randn({3, 5}) * 10).to(dtype));
  }
  tensors.emplace_back("empty", at::zeros({0, 4}));
  tensors.emplace_back("strided", at::randn({6, 4}).t());  // stored contiguous
  bpt::io::save_safetensors((dir / "a.safetensors").string(), tensors, {{"format", "pt"}});

  const bpt::io::SafetensorsFile file((dir / "a.safetensors").string());
  REQUIRE(file.metadata().at("format") == "pt");
  REQUIRE(file.names().size() == tensors.size());
  for (const auto& [name, tensor] : tensors) {
    INFO(name);
    const at::Tensor loaded = file.tensor(name);
    REQUIRE(loaded.scalar_type() == tensor.scalar_type());
    REQUIRE(at::equal(loaded, tensor));
  }
  fs::remove_all(dir);
}

TEST_CASE("a directory is sharded past the limit and read back through its index", "[safetensors]") {
  const fs::path dir = scratch_dir("shards");
  NamedTensors tensors;
  for (int i = 0; i < 5; ++i) tensors.emplace_back("w" + std::to_string(i), at::randn({100}));  // 400 bytes each
  write_bytes(dir / "model.safetensors", "stale");  // from an earlier, unsharded save
  const auto files = bpt::io::save_safetensors_dir(dir.string(), tensors, 1000);
  REQUIRE(files == std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                            "model-00003-of-00003.safetensors", "model.safetensors.index.json"});
  REQUIRE_FALSE(fs::exists(dir / "model.safetensors"));

  const bpt::io::SafetensorsDir loaded(dir.string());
  REQUIRE(loaded.names().size() == 5);
  for (const auto& [name, tensor] : tensors) REQUIRE(at::equal(loaded.tensor(name), tensor));
  REQUIRE(loaded.file("w4").path() == (dir / "model-00003-of-00003.safetensors").string());
  REQUIRE_THROWS_WITH(loaded.tensor("w5"), Catch::Contains("no tensor 'w5' in the checkpoint"));

  // Saved again small enough for one file: the shards and the index go.
  bpt::io::save_safetensors_dir(dir.string(), {tensors[0]}, 1000);
  REQUIRE(fs::exists(dir / "model.safetensors"));
  REQUIRE_FALSE(fs::exists(dir / "model.safetensors.index.json"));
  REQUIRE_FALSE(fs::exists(dir / "model-00001-of-00003.safetensors"));
  fs::remove_all(dir);
}

TEST_CASE("corrupt safetensors files are refused with the file and tensor named", "[safetensors]") {
  const fs::path dir = scratch_dir("corrupt");
  const std::string path = (dir / "bad.safetensors").string();
  using Catch::Contains;
  const auto refuses = [&](const std::string& header, size_t data_bytes, const std::string& message) {
    write_raw(path, header, data_bytes);
    INFO(header);
    REQUIRE_THROWS_AS(bpt::io::SafetensorsFile(path), bpt::InputError);
    REQUIRE_THROWS_WITH(bpt::io::SafetensorsFile(path), Contains(path) && Contains(message));
  };
  refuses(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4, "tensor 'a': data ends at byte 8");
  refuses(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8, "needs 12 bytes");
  refuses(R"({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", 2, "dtype 'F8_E4M3' is not supported");
  refuses(R"({"a": {"dtype": "F32", "shape": [2]}})", 8, "missing 'data_offsets'");
  refuses(R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8, "not a size");
  refuses(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12, "'a' [0, 8] and 'b' [4, 12] overlap");
  // An empty tensor between two overlapping ones hides nothing.
  refuses(R"({"a": {"dtype": "U8", "shape": [100], "data_offsets": [0, 100]},
              "b": {"dtype": "U8", "shape": [0], "data_offsets": [10, 10]},
              "c": {"dtype": "U8", "shape": [10], "data_offsets": [20, 30]}})", 100, "'a' [0, 100] and 'c' [20, 30] overlap");
  // Element counts that wrap around 64 bits.
  refuses(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0, "too many elements");
  refuses(R"({"a": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 0]}})", 0, "too large");
  refuses(R"([1, 2])", 0, "header is not a JSON object");
  refuses(R"({"a": )", 0, "header is not valid JSON");

  write_bytes(path, "abc");
  REQUIRE_THROWS_WITH(bpt::io::SafetensorsFile(path), Contains("too short"));
  write_bytes(path, std::string("\xff\xff\xff\x00\x00\x00\x00\x00", 8) + "{}");
  REQUIRE_THROWS_WITH(bpt::io::SafetensorsFile(path), Contains("header claims 16777215 bytes"));
  REQUIRE_THROWS_WITH(bpt::io::SafetensorsFile((dir / "absent.safetensors").string()), Contains("cannot open"));
  REQUIRE_THROWS_WITH(bpt::io::SafetensorsDir(dir.string()), Contains("no model.safetensors"));
  fs::remove_all(dir);
}
