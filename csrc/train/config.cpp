#include "csrc/train/config.h"

#include "models/llama/config.h"

namespace bpt::train {
namespace {

void register_dataset(DatasetConfig& d, const std::string& prefix, io::FlagSet& flags) {
  flags.add(prefix + ".type", "json (JSONL files) or synthetic (random tokens, for benchmarks)", &d.type);
  flags.add(prefix + ".text_processor.fields",
            "fields joined into a document: a,b; a+b joins with a space; [a] carries no loss; <|bos|>, <|eos|>",
            &d.fields);
  flags.add(prefix + ".text_processor.add_bos_token", "start each document with BOS", &d.add_bos_token);
  flags.add(prefix + ".text_processor.add_eos_token", "end each document with EOS", &d.add_eos_token);
  flags.add(prefix + ".json_dataset.path", "JSONL file(s), comma-separated", &d.path);
  flags.add(prefix + ".json_dataset.seq_length", "tokens per row", &d.seq_length);
  flags.add(prefix + ".json_dataset.batch_size", "rows per batch", &d.batch_size);
  flags.add(prefix + ".json_dataset.tokenizer_processes", "tokenizer threads", &d.tokenizer_processes);
  flags.add(prefix + ".json_dataset.shuffle", "a new seeded document order each epoch", &d.shuffle);
}

}  // namespace

void register_flags(TrainConfig& c, io::FlagSet& flags) {
  flags.add("model", "llama; bllama: LLaMA with BitNet b1.58 BitLinear layers (any preset; bllama-1.7b is the "
            "seed's size); glam: 64 experts in every other layer (GLaM; presets glam-126m-64e, glam-64b-64e)", &c.model);
  flags.add("load_llama_config", "model preset (tiny, 1b, 7b, llama2-7b, llama3-8b, ...) or a directory with "
            "config.json; empty: load_checkpoint's config.json, or tiny without one", &c.load_llama_config);
  flags.add("update_llama_config", "config overrides: field=value,field=value", &c.update_llama_config);
  flags.add("dtype", "parameter and compute dtype: float32, bf16 (fp32 master weights) or fp16", &c.dtype);
  flags.add("device", "cpu, or cuda (a CUDA build: make build-cuda): each rank on GPU LOCAL_RANK, NCCL between them",
            &c.device);
  flags.add("total_steps", "optimizer updates to train for", &c.trainer.total_steps);
  flags.add("log_freq", "log metrics every this many steps", &c.trainer.log_freq);
  flags.add("save_model_freq", "save the checkpoint (replacing the last) every this many steps; 0: at the end only",
            &c.trainer.save_model_freq);
  flags.add("save_milestone_freq", "also keep a milestone checkpoint every this many steps; 0: none",
            &c.trainer.save_milestone_freq);
  flags.add("eval_freq", "evaluate every this many steps; 0: never", &c.trainer.eval_freq);
  flags.add("eval_steps", "batches per evaluation", &c.trainer.eval_steps);
  flags.add("load_checkpoint", "params::DIR (weights), trainstate::DIR (weights, optimizer, step, data) or hf::DIR",
            &c.load_checkpoint);
  flags.add("finetune.mode", "full (every parameter trains) or lora (adapters on the frozen load_checkpoint model; "
            "checkpoints are peft adapter directories)", &c.finetune.mode);
  flags.add("finetune.lora_rank", "LoRA rank r", &c.finetune.lora_rank);
  flags.add("finetune.lora_alpha", "LoRA alpha: the update is scaled by alpha / r", &c.finetune.lora_alpha);
  flags.add("finetune.lora_dropout", "dropout on the adapters' input", &c.finetune.lora_dropout);
  flags.add("finetune.lora_target", "projections with adapters: all, attention, mlp, or names (q_proj,v_proj,...)",
            &c.finetune.lora_target);
  flags.add("load_dataset_state", "a trainer_state.json whose data position to start from", &c.load_dataset_state);
  flags.add("tokenizer.vocab_file", "SentencePiece tokenizer.model (json datasets)", &c.tokenizer_vocab_file);
  flags.add("optimizer.type", "adamw (the only one)", &c.optimizer_type);
  AdamWOptions& a = c.adamw;
  flags.add("optimizer.adamw_optimizer.init_lr", "learning rate at step 0, where the warm-up starts", &a.init_lr);
  flags.add("optimizer.adamw_optimizer.lr", "peak learning rate", &a.lr);
  flags.add("optimizer.adamw_optimizer.end_lr", "learning rate at the end of the decay", &a.end_lr);
  flags.add("optimizer.adamw_optimizer.lr_warmup_steps", "linear warm-up steps", &a.lr_warmup_steps);
  flags.add("optimizer.adamw_optimizer.lr_decay_steps", "steps to reach end_lr, warm-up included; 0: no decay",
            &a.lr_decay_steps);
  flags.add("optimizer.adamw_optimizer.lr_schedule", "cosine or linear decay", &a.lr_schedule);
  flags.add("optimizer.adamw_optimizer.weight_decay", "decoupled weight decay (not on norms or embeddings)",
            &a.weight_decay);
  flags.add("optimizer.adamw_optimizer.decay_embeddings", "apply weight decay to embeddings too", &a.decay_embeddings);
  flags.add("optimizer.adamw_optimizer.b1", "Adam beta1", &a.b1);
  flags.add("optimizer.adamw_optimizer.b2", "Adam beta2", &a.b2);
  flags.add("optimizer.adamw_optimizer.eps", "Adam epsilon", &a.eps);
  flags.add("optimizer.adamw_optimizer.clip_gradient", "global gradient-norm clip; 0: off", &a.clip_gradient);
  flags.add("optimizer.adamw_optimizer.accumulate_gradient_steps", "micro-batches per optimizer step",
            &c.trainer.accumulate_gradient_steps);
  flags.add("optimizer.accumulate_gradient_steps", "the same (EasyLM's name for it)",
            &c.trainer.accumulate_gradient_steps);
  register_dataset(c.train_dataset, "train_dataset", flags);
  register_dataset(c.eval_dataset, "eval_dataset", flags);
  flags.add("checkpointer.save_optimizer_state", "save the optimizer state with each checkpoint",
            &c.trainer.save_optimizer_state);
  flags.add("autoresume", "continue from the newest complete checkpoint in logger.output_dir", &c.trainer.autoresume);
  flags.add("seed", "random seed (weights, data order)", &c.seed);
  flags.add("mesh_dim", "dp,fsdp,tp: ranks replicating, ranks sharding the model, tensor-parallel ranks (1 only); "
            "one -1 takes the ranks left", &c.mesh_dim);
  flags.add("fsdp.fp32_reduce", "reduce-scatter gradients in fp32 (bf16/fp16 models)", &c.fsdp.fp32_reduce);
  flags.add("fsdp.prefetch", "start the next layer's all-gather before computing this one", &c.fsdp.prefetch);
  flags.add("expert_parallel", "place each MoE layer's experts across the fsdp group's ranks (E / fsdp each, tokens "
            "exchanged by all-to-all) instead of sharding them", &c.expert_parallel);
  flags.add("dist_timeout", "seconds a collective or the rendezvous may wait for the other ranks", &c.dist_timeout_s);
  flags.add("logger.output_dir", "where checkpoints and metrics.jsonl go", &c.trainer.output_dir);
  flags.add("peak_flops", "peak FLOP/s for MFU; 0: measured once by a matmul", &c.trainer.peak_flops);
  flags.add("progress", "auto (a progress bar on a terminal), always or never", &c.trainer.progress);
  // --llama.<field>: checked against LlamaConfig's fields; applied after load_llama_config.
  flags.add_prefix(
      "llama.", "LLaMA config fields (--llama.<field>=value; in brackets: the tiny preset's values):",
      [&c](const std::string& field, const std::string& value) { c.llama_overrides.emplace_back(field, value); },
      [] { return models::llama::preset("tiny").fields(); });
}

}  // namespace bpt::train
