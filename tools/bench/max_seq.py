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

    tools/bench/max_seq.py [--quick] [--cap-mb 512] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_mb, reset_peak_memory, write_records  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cap 256 MB, search up to T=16k")
    parser.add_argument("--cap-mb", type=float, help="memory cap for one step (default 512, 256 with --quick)")
    parser.add_argument("--max-t", type=int, help="longest T tried (default 65536, 16384 with --quick)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per trial")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        t = json.loads(args.trial)
        ms, peak = train_step(t["variant"], t["T"])
        print(json.dumps({"ms": ms, "peak_mb": peak}))
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
