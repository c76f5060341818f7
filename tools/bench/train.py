"""train: bpt-train's training step vs an eager PyTorch loop (transformers' LlamaForCausalLM and
torch.optim.AdamW) on the same model and synthetic data, side by side; and bpt-train's peak
memory per remat policy and with BPT chunking on and off.

Model: D=512, 8 layers, 8 heads, intermediate 1376, vocab 32000 (as llama.py), batch 1, fp32.
Each case runs a few steps in its own process; step_ms is the median step after two warm-up
steps; step_peak_mb is the process's whole peak resident memory (model, optimizer and
activations; bpt-train's own VmHWM, read from its metrics.jsonl).

- task=loop: T=2048, fp32 and bf16: bpt (remat everything_saveable: no recomputation, as the
  PyTorch loop), bpt-remat (nothing_saveable, llamabpt's default) vs hf-sdpa and hf-eager. bpt's
  bf16 keeps fp32 master weights in AdamW; the PyTorch loop's bf16 trains bf16 parameters.
- task=memory: bpt alone at T=8192 (--quick: 4096), fp32, under each remat policy, and with
  every chunk size -1 (no blockwise attention/FFN/loss chunking); 3 steps each.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, hf_training_ms, main  # noqa: E402

PHASES = ("step",)
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=16384)
STEPS, WARMUP = 6, 2  # task=memory: 3 and 1


def cases(args):
    loop = [{"task": "loop", "T": 2048, "dtype": dtype, "impl": impl}
            for dtype in ("float32", "bfloat16") for impl in ("bpt", "bpt-remat", "hf-sdpa", "hf-eager")]
    T = 4096 if args.quick else 8192
    memory = [{"task": "memory", "T": T, "remat": remat, "chunking": True, "impl": "bpt"}
              for remat in ("nothing_saveable", "checkpoint_dots", "everything_saveable")]
    memory.append({"task": "memory", "T": T, "remat": "nothing_saveable", "chunking": False, "impl": "bpt"})
    return loop + memory


def annotate(record):
    record["tokens_per_s"] = record["params"]["T"] / (record["ms"] / 1e3)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_bpt(p):
    update = ",".join(f"{k}={v}" for k, v in MODEL.items() if k != "max_position_embeddings")
    chunks = 256 if p.get("chunking", True) else -1
    remat = p.get("remat", "nothing_saveable" if p["impl"] == "bpt-remat" else "everything_saveable")
    steps, warmup = (3, 1) if p["task"] == "memory" else (STEPS, WARMUP)
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(REPO / "build" / "bpt-train"), "--load_llama_config=tiny", f"--update_llama_config={update}",
               "--train_dataset.type=synthetic", f"--train_dataset.json_dataset.seq_length={p['T']}",
               "--train_dataset.json_dataset.batch_size=1", f"--total_steps={steps}", "--log_freq=1",
               f"--dtype={p.get('dtype', 'float32')}", "--progress=never", f"--logger.output_dir={out}",
               f"--llama.remat_policy={remat}",
               f"--llama.q_chunk_size={chunks}", f"--llama.k_chunk_size={chunks}",
               f"--llama.ffn_chunk_size={chunks if chunks < 0 else 2048}",
               f"--llama.loss_chunk_size={chunks if chunks < 0 else 1024}", "--peak_flops=1e12"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=3000)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][warmup:]
    ms = statistics.median(p["T"] / r["tokens_per_s"] * 1e3 for r in timed)
    return ms, max(r["peak_memory_mb"] for r in records)


def run_hf(p):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    attn = "eager" if p["impl"] == "hf-eager" else "sdpa"
    model = LlamaForCausalLM(LlamaConfig(**MODEL, attn_implementation=attn)).to(getattr(torch, p["dtype"]))
    return hf_training_ms(model, 1, p["T"], STEPS, WARMUP), peak_rss_mb()


def run_phase(p, phase):
    return run_bpt(p) if p["impl"].startswith("bpt") else run_hf(p)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, annotate=annotate)
