"""fsdp: bpt-train sharded over 2 processes (FSDP over Gloo) vs one process, and vs PyTorch's
own FSDP2 on the same model and data, side by side.

Model: D=512, 8 layers, 8 heads, intermediate 1376, vocab 32000 (as train.py), fp32; T=1024
and a global batch of 2 rows (--quick: T=256, 4 layers). Every case is the same work: at
world 2 each rank takes one of the two rows.

- bpt-w1: bpt-train in one process (remat nothing_saveable: each layer recomputed in backward);
- bpt-fsdp2: bpt-train under tools/launch --nproc 2 (its default mesh: shard over both ranks);
- bpt-fsdp2-saveable: the same with remat everything_saveable: each layer stays gathered with
  its activations until backward, nothing is recomputed (as the torch loops below);
- torch-w1: an eager loop over transformers' LlamaForCausalLM (sdpa attention) and
  torch.optim.AdamW (lr 3e-4, betas 0.9/0.95, weight decay 0.1), gradients clipped to 1.0;
- torch-fsdp2: the same loop at world 2 under torchrun, Gloo on CPU, the model wrapped with
  torch.distributed.fsdp.fully_shard per decoder layer and then the root (as torchtitan).
  The baseline of the ratios.

Both world-2 runs give each rank OMP_NUM_THREADS = cores / 2 (as tools/launch does); the
world-1 runs use every core. Each case runs 6 steps; step_ms is the median after two warm-up
steps (bpt: from the global tokens_per_s in its metrics.jsonl; torch: rank 0's wall time
from forward to optimizer step). step_peak_mb is rank 0's whole peak resident memory
(VmHWM: model, optimizer state, activations, and for torch the Python runtime); tokens_per_s
is the global rate, B * T / step time.

bpt's cases record state_mb, the shards of parameters and gradients and the optimizer state
rank 0 keeps between steps (from its metrics.jsonl); the bpt-fsdp2 cases also record
comm_mb_per_step, the bytes of the buffers rank 0 handed to all-gathers and reduce-scatters
in a step, and comm_theory_mb, FSDP's 3 x the parameter bytes (gather for forward, gather
again for backward, reduce-scatter the gradients). bpt gathers the root unit (embedding,
final norm, head) once per step, not twice, and a layer kept gathered (everything_saveable)
once, so it passes less than that.

    .venv/bin/python tools/bench/fsdp.py [--quick] [--out FILE] [--set T=64,hidden_size=64,...]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, hf_training_ms, main, peak_memory_mb  # noqa: E402

PHASES = ("step",)
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8)
IMPLS = ("bpt-w1", "bpt-fsdp2", "bpt-fsdp2-saveable", "torch-w1", "torch-fsdp2")
STEPS, WARMUP = 6, 2
WORLD = 2
THREADS = max(1, (os.cpu_count() or 1) // WORLD)  # per rank at world 2


def add_args(parser):
    parser.add_argument("--set", default="", metavar="K=V,...",
                        help="override case params (T, B) or model fields, e.g. for a smoke test "
                             "T=64,hidden_size=64,intermediate_size=160,num_hidden_layers=2,vocab_size=256")


def cases(args):
    base = {"T": 256, "B": 2, "num_hidden_layers": 4} if args.quick else {"T": 1024, "B": 2}
    base.update((k, int(v)) for k, v in (kv.split("=") for kv in args.set.split(",") if kv))
    return [{**base, "impl": impl} for impl in IMPLS]


def annotate(record):
    record["tokens_per_s"] = record["params"]["B"] * record["params"]["T"] / (record["ms"] / 1e3)


def model_config(p) -> dict:
    return {k: p.get(k, v) for k, v in MODEL.items()}


def parameter_bytes(c) -> int:
    """fp32 LLaMA: embedding and an untied head, per layer q/k/v/o, SwiGLU and two norms, a final norm."""
    D, kv = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    layer = 2 * D * D + 2 * D * kv + 3 * D * c["intermediate_size"] + 2 * D
    return 4 * (2 * c["vocab_size"] * D + c["num_hidden_layers"] * layer + D)


def run_bpt(p):
    config = model_config(p)
    update = ",".join(f"{k}={v}" for k, v in config.items())
    remat = "everything_saveable" if p["impl"].endswith("-saveable") else "nothing_saveable"
    with tempfile.TemporaryDirectory() as out:
        args = ["--load_llama_config=tiny", f"--update_llama_config={update}", "--train_dataset.type=synthetic",
                f"--train_dataset.json_dataset.seq_length={p['T']}",
                f"--train_dataset.json_dataset.batch_size={p['B']}", f"--total_steps={STEPS}", "--log_freq=1",
                "--dtype=float32", "--progress=never", f"--logger.output_dir={out}",
                f"--llama.remat_policy={remat}", "--peak_flops=1e12"]
        if p["impl"].startswith("bpt-fsdp2"):
            cmd = [str(REPO / "tools" / "launch"), "--nproc", str(WORLD), "bpt-train", *args]
            env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        else:
            cmd, env = [str(REPO / "build" / "bpt-train"), *args], None
        subprocess.run(cmd, check=True, capture_output=True, timeout=3000, env=env)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][WARMUP:]
    ms = statistics.median(p["B"] * p["T"] / r["tokens_per_s"] * 1e3 for r in timed)
    extra = {"state_mb": timed[-1]["state_mb"]}
    if p["impl"].startswith("bpt-fsdp2"):
        extra.update(comm_mb_per_step=statistics.median(r["comm_mb_per_step"] for r in timed),
                     comm_theory_mb=3 * parameter_bytes(config) / 1e6)
    return ms, max(r["peak_memory_mb"] for r in records), extra


def hf_model(p):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**model_config(p), attn_implementation="sdpa"))


def torch_worker(p, result: Path):
    """One rank of torch-fsdp2, under torchrun; rank 0 writes [step ms, peak MB] to result."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = hf_model(p)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ms = hf_training_ms(model, p["B"] // dist.get_world_size(), p["T"], STEPS, WARMUP, seed=1 + dist.get_rank())
    if dist.get_rank() == 0:
        result.write_text(json.dumps([ms, peak_memory_mb()]))
    dist.destroy_process_group()


def run_torch(p):
    if p["impl"] == "torch-w1":
        return hf_training_ms(hf_model(p), p["B"], p["T"], STEPS, WARMUP, seed=1), peak_memory_mb()
    with tempfile.TemporaryDirectory() as out:
        result = Path(out) / "rank0.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
               __file__, "--torch-worker", json.dumps(p), str(result)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=3000,
                       env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        ms, peak = json.loads(result.read_text())
    return ms, peak


def run_phase(p, phase):
    return run_bpt(p) if p["impl"].startswith("bpt") else run_torch(p)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--torch-worker"]:
        torch_worker(json.loads(sys.argv[2]), Path(sys.argv[3]))
    else:
        main(__file__, cases, PHASES, run_phase, add_args, annotate)
