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

--device cuda (a GPU, a CUDA torch, and build-cuda/bpt-train from `make build-cuda`): bpt-train
--device cuda alone, on a ~1B LLaMA (hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab
32000; --quick: hidden 256, 2 layers, 4 heads, intermediate 688, T=1024) at T=8192, batch 1,
bf16 (fp32 master weights), chunks as above: bpt (everything_saveable) and bpt-remat
(nothing_saveable); 8 steps, the median of the last 5. tokens_per_s as on the CPU; mfu is
bpt-train's own (model FLOPs per token: 6 per matmul weight plus 12 L H d T for attention, the
causal mask not halving it) against --peak_flops 989e12 (H100 SXM bf16 dense). step_peak_mb
stays bpt-train's host VmHWM; gpu_peak_allocated_mb and gpu_peak_reserved_mb are the largest of
bpt-train's own per-window GPU peaks (its metrics' gpu_peak_allocated_mb and gpu_peak_reserved_mb:
torch.cuda.max_memory_allocated and max_memory_reserved, in MiB) over the timed steps, the
warm-up's first allocations left out.
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
CUDA_MODELS = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16),
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}
CUDA_STEPS, CUDA_WARMUP = 8, 3
CUDA_PEAK_FLOPS = "989e12"  # H100 SXM, bf16 dense
CUDA_TRAIN = REPO / "build-cuda" / "bpt-train"


def add_args(parser):
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def cases(args):
    if args.device == "cuda":
        if not (CUDA_TRAIN.is_file() and CUDA_TRAIN.stat().st_mode & 0o111):
            sys.exit(f"train: --device cuda runs {CUDA_TRAIN}, which is not there: make build-cuda (on a GPU machine "
                     "with its own torch: BPT_CUDA_PYTHON=python3 make build-cuda)")
        model, T = ("tiny", 1024) if args.quick else ("1b", 8192)
        return [{"task": "cuda", "device": "cuda", "model": model, "T": T, "dtype": "bfloat16", "impl": impl}
                for impl in ("bpt", "bpt-remat")]
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
    gpu = p.get("device") == "cuda"
    model = CUDA_MODELS[p["model"]] if gpu else MODEL
    update = ",".join(f"{k}={v}" for k, v in model.items() if k != "max_position_embeddings")
    chunks = 256 if p.get("chunking", True) else -1
    remat = p.get("remat", "nothing_saveable" if p["impl"] == "bpt-remat" else "everything_saveable")
    steps, warmup = (3, 1) if p["task"] == "memory" else (CUDA_STEPS, CUDA_WARMUP) if gpu else (STEPS, WARMUP)
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(CUDA_TRAIN if gpu else REPO / "build" / "bpt-train"), "--load_llama_config=tiny",
               f"--update_llama_config={update}",
               "--train_dataset.type=synthetic", f"--train_dataset.json_dataset.seq_length={p['T']}",
               "--train_dataset.json_dataset.batch_size=1", f"--total_steps={steps}", "--log_freq=1",
               f"--dtype={p.get('dtype', 'float32')}", "--progress=never", f"--logger.output_dir={out}",
               f"--llama.remat_policy={remat}",
               f"--llama.q_chunk_size={chunks}", f"--llama.k_chunk_size={chunks}",
               f"--llama.ffn_chunk_size={chunks if chunks < 0 else 2048}",
               f"--llama.loss_chunk_size={chunks if chunks < 0 else 1024}",
               f"--peak_flops={CUDA_PEAK_FLOPS if gpu else '1e12'}"]
        if gpu:  # bpt-train always saves at the end: the 1B's weights only, not AdamW's 13 GB
            proc = subprocess.run(cmd + ["--device=cuda", "--checkpointer.save_optimizer_state=false"],
                                  capture_output=True, text=True, timeout=3000)
            if proc.returncode != 0:
                lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines() or ["(no output)"]
                raise RuntimeError(f"bpt-train exited with {proc.returncode}: {lines[-1]}")
        else:
            subprocess.run(cmd, check=True, capture_output=True, timeout=3000)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][warmup:]
    ms = statistics.median(p["T"] / r["tokens_per_s"] * 1e3 for r in timed)
    if not gpu:
        return ms, max(r["peak_memory_mb"] for r in records)
    extra = {"mfu": statistics.median(r["mfu"] for r in timed) if all("mfu" in r for r in timed) else None,
             "gpu_peak_allocated_mb": max(r["gpu_peak_allocated_mb"] for r in timed),
             "gpu_peak_reserved_mb": max(r["gpu_peak_reserved_mb"] for r in timed)}
    return ms, max(r["peak_memory_mb"] for r in records), extra


def run_hf(p):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    attn = "eager" if p["impl"] == "hf-eager" else "sdpa"
    model = LlamaForCausalLM(LlamaConfig(**MODEL, attn_implementation=attn)).to(getattr(torch, p["dtype"]))
    return hf_training_ms(model, 1, p["T"], STEPS, WARMUP), peak_rss_mb()


def run_phase(p, phase):
    return run_bpt(p) if p["impl"].startswith("bpt") else run_hf(p)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, add_args, annotate)
