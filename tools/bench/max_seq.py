"""max_seq: the longest sequence one training step fits in a fixed memory cap, for a small
LLaMA block stack (D=256, 4 heads, 4 layers, hidden 688, vocab 32000, fp32, batch 1),
every block rematerialised (checkpointed) as the seeds recommend:

  vanilla:    naive attention (materialised scores) + full FFN + full LM head and loss
  mem_eff:    bpt blockwise attention only; ffn and loss chunk = -1 (llamabpt's way of
              reducing BPT to the memory-efficient transformer)
  bpt:        blockwise attention + blockwise FFN (chunk 512) + chunked loss (chunk 256)

Each trial runs one forward+backward step in a fresh process, after a warm-up step at
T=256 (so thread pools and BLAS buffers are already there); it fits when the step's peak
resident memory above the process's baseline (model and inputs allocated) is within the cap.
The search doubles T from 256, then bisects to a multiple of 256. Records carry max_T.

--device cuda (a GPU, a CUDA torch, and build-cuda/bpt-train from `make build-cuda`): the same
three settings, as bpt-train --device cuda runs them, on a ~1B LLaMA (hidden 2048, 16 layers,
16 heads, intermediate 5632, vocab 32000; --quick: hidden 256, 2 layers, 4 heads, intermediate
688), bf16 with fp32 master weights, batch 1, every block rematerialised (nothing_saveable):

  vanilla:    q/k chunk -1 (one T x T block: the scores materialised), ffn and loss chunk -1
  mem_eff:    q/k chunk 2048, ffn and loss chunk -1
  bpt:        q/k chunk 2048, ffn chunk 2048, loss chunk 1024 (bpt-train's defaults)

Each probe is one whole training step (AdamW's states are allocated before it, so step 1 holds
what every step holds) in a fresh bpt-train, stopped once step 1's metrics are written. It fits
when that record appears; it does not when bpt-train exits with CUDA's out-of-memory error; any
other failure stops that setting's search and makes the run exit 1. The cap is the whole GPU
(torch.cuda.mem_get_info, recorded as gpu_free_mb); --cap-mb (3072 with --quick) starts a
process that holds the rest. The search starts at 8192 (--start-t), doubles, then bisects to a
multiple of 1024, with at most --max-probes (6) probes per setting and --budget-s (480) seconds
for the run, shared evenly among the settings still to run (time one leaves goes to the next).
A probe is not started when its estimate (overhead + the last fitting step x (T / its T)^2) is
over the time left, and is killed at the deadline; max_T is then a lower bound (note says why).
Records carry max_T, over_T (the shortest T that did not fit; null when none did not),
gpu_used_peak_mb at max_T (nvidia-smi's memory.used less its value before the probe: the CUDA
context and the caching allocator's blocks included, so above torch's allocated peak) and every
probe. TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 is set for bpt-train, as the generic attention
computes in fp32: faster, the same memory.

    tools/bench/max_seq.py [--quick] [--cap-mb 512] [--out FILE]
    tools/bench/max_seq.py --device cuda [--quick] [--budget-s 480] [--settings bpt] [--start-t 65536] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, gpu_memory_used_mb, peak_memory_mb, require_cuda, reset_peak_memory,  # noqa: E402
                    write_records)

D, HEADS, LAYERS, HIDDEN, VOCAB = 256, 4, 4, 688, 32000
ATTN_CHUNK, FFN_CHUNK, LOSS_CHUNK = 256, 512, 256
VARIANTS = ("vanilla", "mem_eff", "bpt")
STEP = 256


def train_step(variant: str, T: int) -> tuple[float, float]:
    """One forward+backward step of the block stack; returns (ms, peak MB above baseline)."""
    _step(variant, STEP)  # warm-up: one-time allocations are not the step's
    return _step(variant, T)


def _step(variant: str, T: int) -> tuple[float, float]:
    import math

    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    import bpt

    torch.manual_seed(0)
    head_dim = D // HEADS
    ops = torch.ops.bpt

    def param(*shape, scale=0.02):
        return (torch.randn(*shape) * scale).requires_grad_()

    embed, head, final_norm = param(VOCAB, D), param(VOCAB, D), torch.ones(D, requires_grad=True)
    layers = [
        {
            "attn_norm": torch.ones(D, requires_grad=True), "ffn_norm": torch.ones(D, requires_grad=True),
            "wq": param(D, D), "wk": param(D, D), "wv": param(D, D), "wo": param(D, D),
            "w_gate": param(HIDDEN, D), "w_up": param(HIDDEN, D), "w_down": param(D, HIDDEN),
        }
        for _ in range(LAYERS)
    ]
    tokens = torch.randint(0, VOCAB, (1, T + 1))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(T).float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal_mask = None

    def attention(q, k, v):
        nonlocal causal_mask
        if variant != "vanilla":
            return ops.blockwise_attention(q, k, v, causal=True, q_chunk=ATTN_CHUNK, k_chunk=ATTN_CHUNK)[0]
        if causal_mask is None:
            causal_mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        return torch.softmax(scores.masked_fill(causal_mask, float("-inf")), -1) @ v

    def block(x, w):
        h = bpt.rms_norm(x, w["attn_norm"])
        split = lambda t: t.view(1, T, HEADS, head_dim).transpose(1, 2)  # noqa: E731
        q = bpt.rotary(split(h @ w["wq"].T), cos, sin)
        k = bpt.rotary(split(h @ w["wk"].T), cos, sin)
        o = attention(q, k, split(h @ w["wv"].T)).transpose(1, 2).reshape(1, T, D)
        x = x + o @ w["wo"].T
        h = bpt.rms_norm(x, w["ffn_norm"])
        chunk = FFN_CHUNK if variant == "bpt" else -1
        return x + ops.blockwise_ffn(h, w["w_gate"], w["w_up"], w["w_down"], chunk=chunk)

    def step():
        x = F.embedding(tokens[:, :T], embed)
        for w in layers:
            x = checkpoint(block, x, w, use_reentrant=False)
        h = bpt.rms_norm(x, final_norm)
        chunk = LOSS_CHUNK if variant == "bpt" else -1
        loss = ops.chunked_lm_loss(h, head, tokens[:, 1:], chunk=chunk)[0]
        loss.backward()

    base = reset_peak_memory()
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3, peak_memory_mb() - base


def trial(variant: str, T: int, cap_mb: float, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--trial", json.dumps({"variant": variant, "T": T, "cap_mb": cap_mb})]
    # A fixed mmap threshold: glibc would otherwise raise it after the warm-up step's frees and
    # keep freed blocks on its heap, where the measured step reuses them unseen by the peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"fits": False, "why": "timeout"}
    if proc.returncode != 0:
        return {"fits": False, "why": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["fits"] = result["peak_mb"] <= cap_mb
    return result


def search(variant: str, cap_mb: float, max_T: int, timeout: float) -> dict:
    """Largest multiple of STEP that fits: doubling, then bisection."""
    best, best_result, lo, hi = 0, None, 0, None
    T = STEP
    while T <= max_T:
        r = trial(variant, T, cap_mb, timeout)
        print(f"  {variant:>8} T={T:>6}: {'fits' if r['fits'] else 'over'} "
              f"({r.get('peak_mb', float('nan')):.0f} MB, {r.get('ms', float('nan')):.0f} ms) {r.get('why', '')}",
              flush=True)
        if not r["fits"]:
            hi = T
            break
        best, best_result, lo = T, r, T
        T *= 2
    while hi is not None and hi - lo > STEP:
        mid = (lo + hi) // 2 // STEP * STEP
        r = trial(variant, mid, cap_mb, timeout)
        print(f"  {variant:>8} T={mid:>6}: {'fits' if r['fits'] else 'over'} ({r.get('peak_mb', float('nan')):.0f} MB)",
              flush=True)
        if r["fits"]:
            best, best_result, lo = mid, r, mid
        else:
            hi = mid
    record = {"bench": "max_seq", "impl": variant,
              "params": {"cap_mb": cap_mb, "D": D, "layers": LAYERS, "vocab": VOCAB}, "max_T": best}
    if best_result:
        record.update({"ms": best_result["ms"], "step_ms": best_result["ms"], "peak_mb": best_result["peak_mb"]})
    if best == max_T:
        record["note"] = f"reached the search limit {max_T}"
    return record


# --device cuda: bpt-train on the GPU, one process per probe.
CUDA_TRAIN = REPO / "build-cuda" / "bpt-train"
CUDA_MODELS = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=16),
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}
# (q and k chunk, ffn chunk, loss chunk) per setting; -1: unchunked. 2048-token attention blocks
# keep the generic attention's kernel launches few at long T ([16, 2048, 2048] fp32 scores: 256 MB).
CUDA_CHUNKS = {"vanilla": (-1, -1, -1), "mem_eff": (2048, -1, -1), "bpt": (2048, 2048, 1024)}
CUDA_START, CUDA_STEP = 8192, 1024
CUDA_QUICK_CAP_MB = 3072
OOM_MARKERS = ("out of memory", "alloc_failed")  # c10's OutOfMemoryError, CUDA's error 2, CUBLAS_STATUS_ALLOC_FAILED


def hold_gpu_memory(cap_mb):
    """Starts a process that reports GPU 0's memory (torch.cuda.mem_get_info) and, with cap_mb,
    allocates all of the free memory but cap_mb and keeps it until its stdin closes. Returns
    (process or None, {"gpu_total_mb", "gpu_free_mb"}: free is what a probe then has)."""
    cmd = [sys.executable, __file__, "--hold-gpu", json.dumps(cap_mb)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.kill()
        why = (proc.communicate()[1].strip().splitlines() or ["(no output)"])[-1]
        sys.exit(f"max_seq: reading the GPU's memory failed: {why}")
    info = json.loads(line)
    if cap_mb is None:
        proc.wait()
        return None, info
    return proc, info


def _hold_gpu(cap_mb):
    import torch

    free, total = torch.cuda.mem_get_info()
    held = max(0, free - int(cap_mb * 2**20)) if cap_mb is not None else 0
    block = torch.empty(held, dtype=torch.uint8, device="cuda") if held else None  # noqa: F841 (held while we wait)
    free = torch.cuda.mem_get_info()[0]
    print(json.dumps({"gpu_total_mb": round(total / 2**20), "gpu_free_mb": round(free / 2**20)}), flush=True)
    if held:
        sys.stdin.read()  # until the search is done (or its process gone)


def _first_step(metrics: Path):
    """Step 1's record in bpt-train's metrics.jsonl, or None while it is not (fully) written."""
    try:
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "tokens_per_s" in record:
                return record
    except (OSError, ValueError):
        pass
    return None


def gpu_memory_settled(baseline_mb, until: float):
    """nvidia-smi's memory.used once it is back within 512 MB of baseline_mb (the GPU before any
    probe: the last probe's memory may still be being released), or at `until`."""
    used = gpu_memory_used_mb()
    while used is not None and baseline_mb is not None and used > baseline_mb + 512 and time.perf_counter() < until:
        time.sleep(0.5)
        used = gpu_memory_used_mb()
    return used


def cuda_probe(variant: str, model: str, T: int, time_limit_s: float, baseline_mb=None) -> dict:
    """One training step of bpt-train --device cuda at T; {"T", "result": fits | over | error |
    timeout, "wall_s", and for a fit "step_ms", "gpu_used_peak_mb"; "why" otherwise}."""
    attn, ffn, loss = CUDA_CHUNKS[variant]
    update = ",".join(f"{k}={v}" for k, v in CUDA_MODELS[model].items())
    env = {**os.environ, "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}
    with tempfile.TemporaryDirectory(prefix="max_seq_") as out:
        cmd = [str(CUDA_TRAIN), "--device=cuda", "--load_llama_config=tiny", f"--update_llama_config={update}",
               "--train_dataset.type=synthetic", f"--train_dataset.json_dataset.seq_length={T}",
               "--train_dataset.json_dataset.batch_size=1", "--total_steps=1", "--log_freq=1", "--dtype=bfloat16",
               "--progress=never", f"--logger.output_dir={out}", "--checkpointer.save_optimizer_state=false",
               "--peak_flops=989e12", "--llama.remat_policy=nothing_saveable", f"--llama.q_chunk_size={attn}",
               f"--llama.k_chunk_size={attn}", f"--llama.ffn_chunk_size={ffn}", f"--llama.loss_chunk_size={loss}"]
        metrics, stderr_path = Path(out) / "metrics.jsonl", Path(out) / "stderr.txt"
        start = time.perf_counter()
        before = gpu_memory_settled(baseline_mb, start + min(15.0, time_limit_s / 4))
        used_peak = before
        with open(stderr_path, "w") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            while True:
                try:
                    proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
                step = _first_step(metrics)
                # The caching allocator keeps what it has reserved (bpt-train never empties it),
                # so a sample taken after step 1's record holds the step's peak.
                used = gpu_memory_used_mb()
                if used is not None and used_peak is not None:
                    used_peak = max(used_peak, used)
                if step is not None or proc.poll() is not None or time.perf_counter() - start > time_limit_s:
                    break
        finally:
            if proc.poll() is None:  # done with step 1 (no checkpoint needed), or out of time
                proc.kill()
            proc.wait()
        wall = time.perf_counter() - start
        stderr_text = stderr_path.read_text(errors="replace")
    result = {"T": T, "wall_s": round(wall, 1)}
    if step is not None:
        result.update(result="fits", step_ms=T / step["tokens_per_s"] * 1e3, host_peak_mb=step.get("peak_memory_mb"))
        if before is not None:
            result["gpu_used_peak_mb"] = used_peak - before
        return result
    lines = [line for line in stderr_text.strip().splitlines() if line.strip()]
    oom = [line for line in lines if any(m in line.lower() for m in OOM_MARKERS)]
    if oom:
        return {**result, "result": "over", "why": oom[0][:300]}
    if proc.returncode is not None and proc.returncode < 0 and wall >= time_limit_s:
        return {**result, "result": "timeout", "why": f"stopped at the time limit, {time_limit_s:.0f} s"}
    return {**result, "result": "error", "why": (lines or [f"(exit status {proc.returncode}, no output)"])[-1][:300]}


def search_cuda(variant: str, model: str, args, deadline: float, overheads: list) -> dict:
    """Longest multiple of CUDA_STEP that fits, from args.start_t: doubling (halving if the start
    does not fit), then bisection; within args.max_probes probes and the time to `deadline`.
    overheads: seconds a probe took beyond its step (start, model init), shared across settings."""
    probes, lo, hi, note, fit = [], 0, None, None, None  # lo: longest fitting T; hi: shortest not fitting
    while True:
        if hi is None:
            T = min(lo * 2 if lo else args.start_t, args.max_t)
            if lo >= args.max_t:
                note = f"reached the search limit {args.max_t}"
                break
        elif lo == 0:
            T = hi // 2 // CUDA_STEP * CUDA_STEP
            if T < CUDA_STEP:
                note = f"{CUDA_STEP} tokens do not fit"
                break
        else:
            if hi - lo <= CUDA_STEP:
                break
            T = (lo + hi) // 2 // CUDA_STEP * CUDA_STEP
        left = deadline - time.perf_counter()
        if len(probes) >= args.max_probes:
            note = f"stopped after {args.max_probes} probes"
            break
        if fit is not None:
            estimate = max(overheads) + fit["step_ms"] / 1e3 * (T / fit["T"]) ** 2
            if estimate > left:
                note = f"stopped: T={T} would take about {estimate:.0f} s, {max(left, 0):.0f} s left"
                break
        if left < 10:
            note = f"stopped: {max(left, 0):.0f} s left"
            break
        r = cuda_probe(variant, model, T, min(left, args.timeout), args.gpu_baseline_mb)
        probes.append(r)
        shown = (f"fits ({r.get('gpu_used_peak_mb', float('nan')):.0f} MB on the GPU, step {r['step_ms'] / 1e3:.1f} s"
                 if r["result"] == "fits" else f"{r['result']} ({r['why']}")
        print(f"  {variant:>8} T={T:>7}: {shown}, probe {r['wall_s']:.0f} s)", flush=True)
        if r["result"] == "fits":
            overheads.append(max(0.0, r["wall_s"] - r["step_ms"] / 1e3))
            lo, fit = T, r
        elif r["result"] == "over":
            hi = T
        else:
            note = f"stopped: T={T} {r['result']}: {r['why']}"
            break
    attn, ffn, loss = CUDA_CHUNKS[variant]
    config = CUDA_MODELS[model]
    params = {"device": "cuda", "model": model, "D": config["hidden_size"], "layers": config["num_hidden_layers"],
              "heads": config["num_attention_heads"], "intermediate": config["intermediate_size"],
              "vocab": config["vocab_size"], "dtype": "bfloat16", "remat": "nothing_saveable", "q_chunk": attn,
              "k_chunk": attn, "ffn_chunk": ffn, "loss_chunk": loss, "tf32_matmul": True, "cap_mb": args.cap_mb,
              "step": CUDA_STEP, "gpu_free_mb": args.gpu_free_mb, "gpu_total_mb": args.gpu_total_mb}
    record = {"bench": "max_seq", "impl": variant, "params": params, "max_T": lo, "over_T": hi, "probes": probes}
    if fit is not None:
        record.update(ms=fit["step_ms"], step_ms=fit["step_ms"])
        if "gpu_used_peak_mb" in fit:
            record["gpu_used_peak_mb"] = fit["gpu_used_peak_mb"]
        else:
            record["gpu_memory"] = "not measured: no nvidia-smi"
    if hi is None:  # nothing found not to fit: the longest that fits may be anywhere above max_T
        record["max_T_lower_bound"] = True
    if note is not None:
        record["note"] = note
    if probes and probes[-1]["result"] == "error":
        record["error"] = probes[-1]["why"]
    return record


def main_cuda(args):
    require_cuda("max_seq")
    if not (CUDA_TRAIN.is_file() and CUDA_TRAIN.stat().st_mode & 0o111):
        sys.exit(f"max_seq: --device cuda runs {CUDA_TRAIN}, which is not there: make build-cuda (on a GPU machine "
                 "with its own torch: BPT_CUDA_PYTHON=python3 make build-cuda)")
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in CUDA_CHUNKS]
    if unknown:
        sys.exit(f"max_seq: --settings: unknown {unknown}; expected some of {','.join(VARIANTS)}")
    model = "tiny" if args.quick else "1b"
    args.cap_mb = args.cap_mb or (CUDA_QUICK_CAP_MB if args.quick else None)
    args.max_t = max(CUDA_STEP, (args.max_t or (32768 if args.quick else 1 << 20)) // CUDA_STEP * CUDA_STEP)
    args.start_t = args.start_t // CUDA_STEP * CUDA_STEP or CUDA_STEP
    start = time.perf_counter()
    holder, info = hold_gpu_memory(args.cap_mb)
    args.gpu_free_mb, args.gpu_total_mb = info["gpu_free_mb"], info["gpu_total_mb"]
    args.gpu_baseline_mb = gpu_memory_used_mb()
    cap = f"{args.cap_mb:.0f} MB cap" if args.cap_mb else "the whole GPU"
    print(f"max_seq --device cuda: {model}, {cap} ({args.gpu_free_mb} MB free of {args.gpu_total_mb} MB), "
          f"{args.budget_s:.0f} s budget", flush=True)
    records, overheads = [], []
    try:
        for i, variant in enumerate(settings):
            left = args.budget_s - (time.perf_counter() - start)
            deadline = time.perf_counter() + left / (len(settings) - i)
            records.append(search_cuda(variant, model, args, deadline, overheads))
            if args.out:  # what has run so far survives a run cut short
                write_records(args.out, records, quiet=True)
    finally:
        if holder is not None:
            holder.stdin.close()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
    by = {r["impl"]: r["max_T"] for r in records}
    for r in records:
        r["vs_mem_eff"] = r["max_T"] / by["mem_eff"] if by.get("mem_eff") else None
        r["vs_vanilla"] = r["max_T"] / by["vanilla"] if by.get("vanilla") else None
    print(f"\nmax_seq --device cuda ({cap}, {model}: D={CUDA_MODELS[model]['hidden_size']}, "
          f"{CUDA_MODELS[model]['num_hidden_layers']} layers, bf16; {time.perf_counter() - start:.0f} s)")
    for r in records:
        bound = ">=" if r.get("max_T_lower_bound") else "  "
        over = f"{r['over_T']} does not" if r["over_T"] else "none found not to fit"
        memory = f", {r['gpu_used_peak_mb']:.0f} MB on the GPU" if "gpu_used_peak_mb" in r else ""
        print(f"  {r['impl']:>8}: max_T {bound}{r['max_T']:>7} ({over}{memory})"
              + (f"  [{r['note']}]" if "note" in r else ""))
    if args.out:
        write_records(args.out, records, gpu=True)
    if any("error" in r for r in records):
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="cap 256 MB, search up to T=16k (cuda: a tiny model, 3072 MB, 32k)")
    parser.add_argument("--cap-mb", type=float, help="memory cap for one step (default 512, 256 with --quick; "
                        "cuda: the whole GPU, 3072 with --quick)")
    parser.add_argument("--max-t", type=int, help="longest T tried (default 65536, 16384 with --quick; "
                        "cuda: 1048576, 32768 with --quick)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per trial")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bpt-train --device cuda on a ~1B LLaMA (build-cuda/, a GPU)")
    parser.add_argument("--budget-s", type=float, default=480, help="--device cuda: seconds for the whole search")
    parser.add_argument("--max-probes", type=int, default=6, help="--device cuda: probes per setting")
    parser.add_argument("--start-t", type=int, default=CUDA_START, help="--device cuda: the first T probed")
    parser.add_argument("--settings", default=",".join(VARIANTS), help="--device cuda: which settings, in order")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    parser.add_argument("--hold-gpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        t = json.loads(args.trial)
        ms, peak = train_step(t["variant"], t["T"])
        print(json.dumps({"ms": ms, "peak_mb": peak}))
        return
    if args.hold_gpu:
        _hold_gpu(json.loads(args.hold_gpu))
        return
    if args.device == "cuda":
        main_cuda(args)
        return
    cap = args.cap_mb or (256 if args.quick else 512)
    max_T = args.max_t or (16384 if args.quick else 65536)
    records = [search(v, cap, max_T, args.timeout) for v in VARIANTS]
    by = {r["impl"]: r["max_T"] for r in records}
    for r in records:
        r["vs_mem_eff"] = r["max_T"] / by["mem_eff"] if by["mem_eff"] else None
        r["vs_vanilla"] = r["max_T"] / by["vanilla"] if by["vanilla"] else None
    print(f"\nmax_seq (cap {cap:.0f} MB, D={D}, {LAYERS} layers, vocab {VOCAB})")
    for r in records:
        print(f"  {r['impl']:>8}: max_T {r['max_T']:>6}  ({r['vs_vanilla'] or 0:.1f}x vanilla, "
              f"{r['vs_mem_eff'] or 0:.1f}x mem_eff)")
    if args.out:
        write_records(args.out, records)


if __name__ == "__main__":
    main()
