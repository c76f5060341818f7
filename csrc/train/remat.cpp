#include "csrc/train/remat.h"

#include <ATen/ATen.h>

#include "csrc/common/error.h"
#include "csrc/nn/checkpoint.h"
#include "models/llama/llama.h"

namespace bpt::train {

RematPolicy parse_remat_policy(const std::string& name) {
  if (name == "nothing_saveable") return RematPolicy::NothingSaveable;
  if (name == "checkpoint_dots") return RematPolicy::CheckpointDots;
  if (name == "everything_saveable") return RematPolicy::EverythingSaveable;
  throw_input_error("llama.remat_policy: expected nothing_saveable, checkpoint_dots or everything_saveable, got '{}'",
                    name);
}

void apply_remat(models::llama::LlamaModelImpl& model, RematPolicy policy) {
  using models::llama::LayerInputs;
  using models::llama::LayerOutput;
  using models::llama::LlamaDecoderLayerImpl;
  switch (policy) {
    case RematPolicy::EverythingSaveable:
      model.run_layer = nullptr;
      return;
    case RematPolicy::NothingSaveable:
      model.run_layer = [](LlamaDecoderLayerImpl& layer, const at::Tensor& h, const LayerInputs& inputs) {
        return LayerOutput::from(nn::checkpoint([&layer, inputs](const std::vector<at::Tensor>& x) {
          return layer.forward(x[0], inputs).tensors();
        }, {h}));
      };
      return;
    case RematPolicy::CheckpointDots:
      model.run_layer = [](LlamaDecoderLayerImpl& layer, const at::Tensor& h, const LayerInputs& inputs) {
        const at::Tensor half = nn::checkpoint([&layer, inputs](const std::vector<at::Tensor>& x) {
                                  return std::vector<at::Tensor>{layer.attention_block(x[0], inputs)};
                                }, {h})[0];
        return LayerOutput::from(nn::checkpoint([&layer](const std::vector<at::Tensor>& x) {
          return layer.mlp_block(x[0]).tensors();
        }, {half}));
      };
      return;
  }
}

}  // namespace bpt::train
