#pragma once
// LLaMA checkpoints in Hugging Face's directory layout: config.json plus model.safetensors (or
// shards with model.safetensors.index.json). A bpt checkpoint is the same directory with
// bpt's own fields under "bpt" in config.json; transformers loads either.
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "csrc/io/safetensors.h"
#include "models/llama/config.h"
#include "models/llama/llama.h"

namespace bpt::io {

// dir/config.json as a LlamaConfig; InputError names the file and field.
models::llama::LlamaConfig read_llama_config(const std::string& dir);

// Copies every parameter of `model` from the checkpoint in `dir`, converting fp32/bf16/fp16 to
// the model's dtype. A missing tensor, a wrong shape (say, another vocabulary size), a
// non-float dtype or a tensor LLaMA has no place for is an InputError naming the file and the
// tensor.
// A sharded checkpoint (written by FSDP ranks, csrc/io/sharded_checkpoint.h) loads the same way.
void load_llama_weights(models::llama::LlamaForCausalLMImpl& model, const std::string& dir);

// The same checks, with each tensor (bpt name, whole, as stored) handed to `use` instead:
// how a sharded model takes only its pieces. `dir` names the checkpoint in messages.
void read_llama_weights(const models::llama::LlamaConfig& config, const TensorReader& checkpoint,
                        const std::string& dir, const std::function<void(const std::string&, const at::Tensor&)>& use);

struct SaveOptions {
  std::optional<c10::ScalarType> dtype;          // default: the model's
  int64_t max_shard_bytes = int64_t{5} << 30;     // Hugging Face's default shard size, 5 GiB
  bool bpt_fields = true;                         // write the "bpt" block into config.json
  std::string tokenizer_from;                     // copy tokenizer files from this directory
};

// Writes config.json, the weights (HF names) and the tokenizer files as one directory `dir`,
// atomically: a crash leaves the old `dir` or the complete new one (AtomicDirectory).
void save_llama(const models::llama::LlamaForCausalLMImpl& model, const std::string& dir,
                const SaveOptions& options = {});
// The same files written into the existing directory `dir` (which the caller makes atomic).
void write_llama(const models::llama::LlamaForCausalLMImpl& model, const std::string& dir,
                 const SaveOptions& options = {});

// dir/config.json for `config` (with bpt's fields under "bpt" unless bpt_fields is false).
void write_llama_config(const models::llama::LlamaConfig& config, const std::string& dir, bool bpt_fields = true);

// Copies the tokenizer files found in `from` (tokenizer.model, tokenizer.json,
// tokenizer_config.json, special_tokens_map.json, generation_config.json) into `to`.
void copy_tokenizer_files(const std::string& from, const std::string& to);

}  // namespace bpt::io
