// torch.classes.bpt.Llama: the C++ LLaMA model from Python (libbpt_models.so), so the Python
// tests compare it with transformers and the benchmarks time it beside them. A TorchScript
// custom class needs no Python headers; `bpt.llama` wraps it.
#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include "csrc/generate/generate.h"
#include "csrc/io/hf_checkpoint.h"
#include "csrc/io/lora_adapter.h"
#include "models/llama/llama.h"

namespace bpt::python {
namespace {

using models::llama::LlamaConfig;
using models::llama::LlamaForCausalLM;

struct Llama : torch::CustomClassHolder {
  // `source`: a checkpoint directory (config.json + safetensors, or a LoRA adapter directory
  // over its base), or "preset:<name>" for a freshly initialised model (seeded by
  // torch.manual_seed). `overrides`: "field=value,...".
  Llama(const std::string& source, const std::string& overrides) : model(nullptr) {
    if (source.rfind("preset:", 0) == 0) {
      LlamaConfig config = models::llama::preset(source.substr(7));
      config.update(overrides);
      config.validate();
      model = LlamaForCausalLM(config);
    } else {
      model = io::load_llama_model(source, [&](LlamaConfig& config) { config.update(overrides); });
    }
  }

  at::Tensor logits(const at::Tensor& input_ids, const std::optional<at::Tensor>& segment_ids) {
    return model->logits(input_ids, segment_ids);
  }

  at::Tensor loss(const at::Tensor& input_ids, const at::Tensor& targets, const std::optional<at::Tensor>& segment_ids) {
    return model->forward(input_ids, targets, segment_ids).loss;
  }

  // Greedy continuation of prompt [T] -> new ids [N].
  at::Tensor generate(const at::Tensor& prompt, int64_t max_new_tokens, bool use_cache) {
    TORCH_CHECK(prompt.dim() == 1, "Llama.generate: prompt must be 1-D token ids, got shape ", prompt.sizes());
    const at::Tensor ids = prompt.to(at::kCPU, at::kLong).contiguous();
    std::vector<int64_t> prompt_ids(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    generate::GenerateOptions options;
    options.max_new_tokens = max_new_tokens;
    options.eos_ids = model->config.eos_token_ids;
    const auto decoder = generate::llama_decoder(model, use_cache);
    return at::tensor(generate::generate(*decoder, prompt_ids, options), at::kLong);
  }

  void save(const std::string& dir, bool hf_format) {
    io::SaveOptions options;
    options.bpt_fields = !hf_format;
    io::save_llama(*model, dir, options);
  }

  std::vector<at::Tensor> parameters() { return model->parameters(); }

  void zero_grad() { model->zero_grad(); }

  LlamaForCausalLM model;
};

const auto llama_class = torch::class_<Llama>("bpt", "Llama")
                             .def(torch::init<std::string, std::string>())
                             .def("logits", &Llama::logits)
                             .def("loss", &Llama::loss)
                             .def("generate", &Llama::generate)
                             .def("save", &Llama::save)
                             .def("parameters", &Llama::parameters)
                             .def("zero_grad", &Llama::zero_grad);

}  // namespace
}  // namespace bpt::python
