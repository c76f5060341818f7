"""bitlinear: BitNet b1.58 inference, bpt::ternary_linear (int8 activations x 2-bit ternary
weights, fp32 x) vs a dense linear in PyTorch, fp32 (the baseline) and bf16, on LLaMA-7B's
projection shapes. Decoding is a GEMV (M = 1 token): memory bound for the dense weights,
which the packed ones cut 16x (fp32) or 8x (bf16).

Extra fields: weight_mb, the weight bytes one call reads (packed bytes for ternary, 4 N K or
2 N K for torch), and weight_gb_per_s = weight_mb / ms.

--quick: (N, K) = (4096, 4096), M = 1. full: (4096, 4096), (11008, 4096), (4096, 11008) x M 1, 8.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, measure  # noqa: E402

PHASES = ("fwd",)
IMPLS = ("ternary", "torch", "torch-bf16")


def cases(args):
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    tokens = [1] if args.quick else [1, 8]
    return [{"N": N, "K": K, "M": M, "impl": impl} for N, K in shapes for M in tokens for impl in IMPLS]


def annotate(record):
    record["weight_gb_per_s"] = record["weight_mb"] / record["ms"]  # MB per ms


def run_phase(p, phase):
    import torch

    import bpt  # noqa: F401  (loads torch.ops.bpt)

    N, K, M = p["N"], p["K"], p["M"]
    impl = p["impl"]

    def setup():
        w = torch.randn(N, K) / K**0.5
        if impl == "ternary":
            packed, scale = torch.ops.bpt.ternary_pack(w)
            return torch.randn(M, K), packed, scale
        dtype = torch.bfloat16 if impl == "torch-bf16" else torch.float32
        return torch.randn(M, K, dtype=dtype), w.to(dtype)

    def ternary(x, packed, scale):
        torch.ops.bpt.ternary_linear(x, packed, scale, K)

    def dense(x, w):
        torch.matmul(x, w.t())

    with torch.no_grad():
        ms, peak = measure(setup, ternary if impl == "ternary" else dense)
    weight_bytes = {"ternary": N * ((K + 3) // 4), "torch": 4 * N * K, "torch-bf16": 2 * N * K}[impl]
    return ms, peak, {"weight_mb": weight_bytes / 1e6}


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, annotate=annotate)
