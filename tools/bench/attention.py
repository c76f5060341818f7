"""attention: bpt.blockwise_attention vs torch's scaled_dot_product_attention (its CPU
flash kernel) vs naive math attention (materialised [T, T] scores), forward and
forward+backward, B=1, Hq=8, D=128.

--quick: T 1k, 2k, 4k, Hkv 8, fp32 and bf16, causal and not (about 3 minutes).
full:    T 1k .. 32k, Hkv 8 and 2; --t, --hkv, --causal pick a part of it. Naive
         attention is skipped where its scores alone would pass 6 GiB.
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, measure  # noqa: E402

PHASES = ("fwd", "fwdbwd")
Q_CHUNK = K_CHUNK = 256
NAIVE_MAX_SCORE_BYTES = 6 << 30


def add_args(parser):
    """--t, --hkv and --causal narrow the full grid (e.g. --t 32768 --hkv 8 --causal yes)."""
    parser.add_argument("--t", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--hkv", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")


def cases(args):
    lengths = [1024, 2048, 4096] if args.quick else args.t
    kv_heads = [8] if args.quick else args.hkv
    return [
        {"T": T, "Hkv": hkv, "causal": causal, "dtype": dtype, "impl": impl}
        for T in lengths
        for hkv in kv_heads
        for causal in (True, False)
        if args.quick or args.causal == "both" or causal == (args.causal == "yes")
        for dtype in ("float32", "bfloat16")
        for impl in ("bpt", "sdpa", "naive")
    ]


def run_phase(p, phase):
    import torch
    import torch.nn.functional as F

    import bpt  # noqa: F401

    B, Hq, D, T, Hkv, causal = 1, 8, 128, p["T"], p["Hkv"], p["causal"]
    dtype = getattr(torch, p["dtype"])
    if p["impl"] == "naive" and Hq * T * T * 4 * 3 > NAIVE_MAX_SCORE_BYTES:
        return None
    train = phase == "fwdbwd"

    def bpt_attention(q, k, v):
        return torch.ops.bpt.blockwise_attention(q, k, v, causal=causal, q_chunk=Q_CHUNK, k_chunk=K_CHUNK)[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hkv != Hq)

    def naive(q, k, v):
        k = k.repeat_interleave(Hq // Hkv, 1)
        v = v.repeat_interleave(Hq // Hkv, 1)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(D)
        if causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(scores, -1).to(q.dtype) @ v

    fn = {"bpt": bpt_attention, "sdpa": sdpa, "naive": naive}[p["impl"]]

    def setup():
        make = lambda h: torch.randn(B, h, T, D, dtype=dtype, requires_grad=train)  # noqa: E731
        return make(Hq), make(Hkv), make(Hkv), torch.randn(B, Hq, T, D, dtype=dtype)

    def step(q, k, v, g):
        if train:
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(g)
        else:
            with torch.no_grad():
                fn(q, k, v)

    return measure(setup, step)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, add_args)
