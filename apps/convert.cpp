// bpt-convert: converts LLaMA checkpoints between Hugging Face's directory layout and bpt's
// (the same safetensors with bpt's fields in config.json), changing dtype and shard size, and
// quantizes bLLaMA checkpoints.
//
//   bpt-convert --input hf/Llama-2-7b --output ckpt/llama2-7b --dtype bfloat16
//   bpt-convert --input ckpt/run/step-1000 --output export/hf --format hf
//   bpt-convert --input runs/bllama/checkpoint --output ckpt/bllama-ternary --quantize ternary
//   bpt-convert --input runs/lora/checkpoint --output export/merged --format hf --merge-lora

#include <cstdio>

#include "apps/app.h"
#include "csrc/io/hf_checkpoint.h"
#include "csrc/io/lora_adapter.h"
#include "models/llama/llama.h"

namespace {

int convert(int argc, char** argv) {
  CLI::App app{"Convert a LLaMA checkpoint between Hugging Face and bpt layouts", "bpt-convert"};
  std::string input, output, format = "bpt", dtype, max_shard_size = "5GB", quantize = "none";
  bool merge_lora = false;
  app.add_option("--input", input, "Source directory: config.json + model.safetensors (or shards + index)")
      ->required();
  app.add_option("--output", output, "Destination directory, replaced as a whole (atomically) if it exists")->required();
  app.add_option("--format", format, "Destination layout: bpt (config.json keeps bpt's chunk sizes) or hf")
      ->check(CLI::IsMember({"bpt", "hf"}))
      ->capture_default_str();
  app.add_option("--dtype", dtype, "Stored dtype: float32, bfloat16 or float16 (default: the source's)");
  app.add_option("--max_shard_size", max_shard_size, "Shard the weights past this size (e.g. 5GB, 500MB, 2GiB)")
      ->capture_default_str();
  app.add_option("--quantize", quantize,
                 "ternary: pack a bLLaMA's BitLinear weights 2 bits per value (docs/bllama.md); the other tensors "
                 "are stored in --dtype, bfloat16 by default")
      ->check(CLI::IsMember({"none", "ternary"}))
      ->capture_default_str();
  app.add_flag("--merge-lora,--merge_lora", merge_lora,
               "--input is a LoRA adapter (a bpt LoRA checkpoint or a peft directory): add its update into the base "
               "weights (from adapter_config.json's base_model_name_or_path) and write the merged model");
  app.footer("Any --llama.<field>=value (see bpt-generate --help) overrides a config field, e.g. chunk sizes.");
  if (const int code = bpt::app::parse(app, argc, argv); code >= 0) return code;

  const bool adapter = bpt::io::is_lora_adapter(input);
  if (adapter && !merge_lora) {
    bpt::throw_input_error("--input {} is a LoRA adapter: pass --merge-lora to write its base with the update added",
                           input);
  }
  if (merge_lora && !adapter) bpt::throw_input_error("--merge-lora: {} has no adapter_config.json", input);
  bpt::io::SaveOptions options;
  if (!dtype.empty()) options.dtype = bpt::models::llama::parse_dtype(dtype, "--dtype");
  options.max_shard_bytes = bpt::parse_bytes(max_shard_size, "--max_shard_size");
  options.bpt_fields = format == "bpt";
  options.tokenizer_from = adapter ? bpt::io::adapter_base(input) : input;

  const auto command_line = bpt::app::command_line_config(app, "");
  bpt::models::llama::LlamaForCausalLM model = bpt::io::load_llama_model(
      input, [&](bpt::models::llama::LlamaConfig& config) {
        command_line(config);
        if (quantize == "ternary" && !config.bitlinear) {
          bpt::throw_input_error("--quantize ternary: {} is not a bLLaMA (its config.json has model_type 'llama'; "
                                 "BitLinear layers are what gets quantized)", input);
        }
      });
  if (merge_lora) {
    if (model->config.bitlinear) {
      bpt::throw_input_error("--merge-lora: {} adapts a bLLaMA, whose ternary BitLinear weights cannot absorb the "
                             "update; use the adapter with its base instead", input);
    }
    model->merge_lora();
  }
  const bpt::models::llama::LlamaConfig& config = model->config;
  if (quantize == "ternary" && config.quantization == "none") {
    model->quantize_bitlinear();
    if (!options.dtype) options.dtype = at::kBFloat16;
  }
  bpt::io::save_llama(*model, output, options);
  int64_t parameters = 0;
  for (const at::Tensor& parameter : model->parameters()) parameters += parameter.numel();
  for (const auto& buffer : model->named_buffers()) {
    if (buffer.key().ends_with(".weight_packed")) parameters += buffer.value().numel() * 4;  // 4 values a byte
  }
  std::printf("bpt-convert: %s -> %s (%s, %s, %lld parameters)\n", input.c_str(), output.c_str(), format.c_str(),
              bpt::models::llama::dtype_string(options.dtype.value_or(config.dtype)).c_str(),
              static_cast<long long>(parameters));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bpt::app::run("bpt-convert", [&] { return convert(argc, argv); });
}
