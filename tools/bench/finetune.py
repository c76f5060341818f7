"""finetune: LoRA vs full fine-tuning of the same Hugging Face LLaMA on the same data, bpt-train
and PyTorch (transformers + peft) side by side: step time, tokens/s, peak memory and the state
each keeps between steps.

Model: D=768, 12 layers, 12 heads, intermediate 2048, vocab 32000, untied head, fp32: 134M
parameters (110M without the head); T=512, B=1 (at B=2 one full fine-tuning step took 29 s
(torch) to 44 s (bpt) on 2 cores shared with other work). --quick: D=128, 2 layers, 4 heads,
intermediate 344, vocab 1000, T=64, B=2. Each process that runs a case builds the model with
transformers (LlamaForCausalLM, random init under torch.manual_seed(0), so every
implementation starts from the same weights); bpt's runs load it from a temporary
save_pretrained directory.

- bpt-full: bpt-train --load_checkpoint=hf::DIR --finetune.mode=full: every parameter trains;
- bpt-lora: the same with --finetune.mode=lora, rank 32, alpha 32, adapters on q, k, v, o,
  gate, up and down (--finetune.lora_target=all), the base frozen;
- torch-full: an eager loop over transformers' LlamaForCausalLM (sdpa attention) and
  torch.optim.AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1), gradients clipped to 1.0;
- torch-lora: the same loop over peft's get_peft_model(LoraConfig(r=32, lora_alpha=32,
  target_modules=the same seven, lora_dropout=0)), AdamW over the adapters alone, and
  enable_input_require_grads() as peft asks for with checkpointing. The baseline of the ratios.

All four recompute each decoder layer in backward: bpt with --llama.remat_policy=
nothing_saveable (its default), the torch loops with transformers' activation (gradient)
checkpointing on every decoder layer (non-reentrant torch.utils.checkpoint). bpt's FFN, loss
and attention chunk sizes are its defaults. Synthetic uniform random tokens, no tokenizer.

Each case runs 6 steps in a fresh process; step_ms is the median after two warm-up steps (bpt:
from tokens_per_s in its metrics.jsonl; torch: wall time from forward to optimizer step);
tokens_per_s is B * T / step_ms. step_peak_mb is the process's whole peak resident memory
(VmHWM, MiB: weights, gradients, optimizer state, activations; bpt-train's own, from its
metrics; torch's includes the Python runtime and building the model). state_mb (1e6 bytes, as
bpt's metrics) is what is held between steps: every parameter, frozen or not, a gradient per
trainable one, and the optimizer state (bpt: from metrics.jsonl; torch: summed over the model's
parameters and .grad and optimizer.state after the last step). trainable_params counts the
trainable tensors' elements (bpt: those in the checkpoint it saves at the end, the adapters for
LoRA; torch: requires_grad parameters); it is in the JSON, not the table.

    .venv/bin/python tools/bench/finetune.py [--quick] [--out FILE] [--set T=128,lora_rank=8,...]
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, main, peak_memory_mb, safetensors_numel  # noqa: E402

PHASES = ("step",)
MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12)
QUICK = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4)
IMPLS = ("bpt-full", "bpt-lora", "torch-full", "torch-lora")
LORA_RANK, LORA_ALPHA = 32, 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # bpt's "all"
STEPS, WARMUP = 6, 2


def add_args(parser):
    parser.add_argument("--set", default="", metavar="K=V,...",
                        help="override case params (T, B, lora_rank, lora_alpha) or model fields "
                             "(num_key_value_heads: num_attention_heads unless set), e.g. T=128,num_hidden_layers=4")


def cases(args):
    base = {"T": 64, "B": 2, **QUICK} if args.quick else {"T": 512, "B": 1}
    base.update((k, int(v)) for k, v in (kv.split("=") for kv in args.set.split(",") if kv))
    return [{**base, "impl": impl} for impl in IMPLS]


def annotate(record):
    record["tokens_per_s"] = record["params"]["B"] * record["params"]["T"] / (record["ms"] / 1e3)


def hf_model(p):
    """The case's model, freshly initialised from the current torch seed, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: p.get(k, v) for k, v in MODEL.items()}
    config = LlamaConfig(**fields, num_key_value_heads=p.get("num_key_value_heads", fields["num_attention_heads"]),
                         max_position_embeddings=max(2048, p["T"]), tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).float().train()


def run_bpt(p):
    lora = p["impl"] == "bpt-lora"
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir, out = Path(tmp) / "hf", Path(tmp) / "run"
        model = hf_model(p)
        model.save_pretrained(hf_dir)
        del model
        args = [f"--load_checkpoint=hf::{hf_dir}", f"--finetune.mode={'lora' if lora else 'full'}",
                "--train_dataset.type=synthetic", f"--train_dataset.json_dataset.seq_length={p['T']}",
                f"--train_dataset.json_dataset.batch_size={p['B']}", f"--total_steps={STEPS}", "--log_freq=1",
                "--dtype=float32", "--progress=never", f"--logger.output_dir={out}",
                "--llama.remat_policy=nothing_saveable", "--peak_flops=1e12"]
        if lora:
            args += [f"--finetune.lora_rank={p.get('lora_rank', LORA_RANK)}",
                     f"--finetune.lora_alpha={p.get('lora_alpha', LORA_ALPHA)}", "--finetune.lora_target=all"]
        subprocess.run([str(REPO / "build" / "bpt-train"), *args], check=True, capture_output=True, timeout=3000)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        # What the run trained is what it saves: the adapters (peft layout), or the whole model.
        saved = out / "checkpoint" / ("adapter_model.safetensors" if lora else "model.safetensors")
        trainable = safetensors_numel(saved)
    timed = [r for r in records if "tokens_per_s" in r][WARMUP:]
    ms = statistics.median(p["B"] * p["T"] / r["tokens_per_s"] * 1e3 for r in timed)
    extra = {"state_mb": timed[-1]["state_mb"], "trainable_params": trainable}
    return ms, max(r["peak_memory_mb"] for r in records), extra


def held_bytes(model, optimizer) -> int:
    """Parameters, the gradients they hold and the optimizer's state tensors, as bpt's state_mb."""
    import torch

    total = sum(q.nbytes + (q.grad.nbytes if q.grad is not None else 0) for q in model.parameters())
    return total + sum(v.nbytes for state in optimizer.state.values() for v in state.values()
                       if isinstance(v, torch.Tensor))


def run_torch(p):
    """Steps as common.hf_training_ms (which builds AdamW over every parameter and keeps its
    optimizer to itself), over the trainable parameters only, and the state held after them."""
    import torch

    model = hf_model(p)
    checkpointing = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    checkpointing()
    if p["impl"] == "torch-lora":
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        config = LoraConfig(r=p.get("lora_rank", LORA_RANK), lora_alpha=p.get("lora_alpha", LORA_ALPHA),
                            target_modules=list(LORA_TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.Generator().manual_seed(1)
    times = []
    for step in range(STEPS):
        ids = torch.randint(0, p.get("vocab_size", MODEL["vocab_size"]), (p["B"], p["T"]), generator=tokens)
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
        if step == STEPS - 1:
            state = held_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
    extra = {"state_mb": state / 1e6, "trainable_params": sum(q.numel() for q in trainable)}
    return statistics.median(times[WARMUP:]), peak_memory_mb(), extra


def run_phase(p, phase):
    return run_bpt(p) if p["impl"].startswith("bpt") else run_torch(p)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, add_args, annotate)
