"""bitlinear: BitNet b1.58 inference, bpt::ternary_linear (int8 activations x 2-bit ternary
weights, fp32 x) vs a dense linear in PyTorch, fp32 (the baseline) and bf16, on LLaMA-7B's
projection shapes. Decoding is a GEMV (M = 1 token): memory bound for the dense weights,
which the packed ones cut 16x (fp32) or 8x (bf16).

Extra fields: weight_mb, the weight bytes one call reads (packed bytes for ternary, 4 N K or
2 N K for torch), and weight_gb_per_s = weight_mb / ms.

--quick: (N, K) = (4096, 4096), M = 1. full: (4096, 4096), (11008, 4096), (4096, 11008) x M 1, 8.

--device cuda (a GPU, a CUDA torch and `make build-cuda`): bf16 x on the GPU, ternary_linear
(its quantize step and the GEMV, M = 1, or the token-tiled GEMM) against F.linear with the bf16
weight (cuBLAS), same shapes, M 1, 4, 16 (--quick: (4096, 4096), M 1 and 16). Times are the
median of calls between CUDA events (common.measure_cuda), peaks torch's allocator's; each
record of a case gets time_vs_torch_bf16 (below 1: ternary is faster), and ternary records get
max_rel_err: the largest |ternary - the op's math in fp32 matmuls| over the largest |that|, a
check that the timed op computes the intended product (bf16 output rounding: at most 2^-8).
"""

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import import_bpt, main, measure, measure_cuda  # noqa: E402

PHASES = ("fwd",)
IMPLS = ("ternary", "torch", "torch-bf16")
CUDA_IMPLS = ("ternary", "torch-bf16")


def add_args(parser):
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def cases(args):
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    if args.device == "cuda":
        import_bpt("bitlinear")  # here, once, rather than a failure in every case
        tokens = [1, 16] if args.quick else [1, 4, 16]
        return [{"device": "cuda", "N": N, "K": K, "M": M, "impl": impl}
                for N, K in shapes for M in tokens for impl in CUDA_IMPLS]
    tokens = [1] if args.quick else [1, 8]
    return [{"N": N, "K": K, "M": M, "impl": impl} for N, K in shapes for M in tokens for impl in IMPLS]


def annotate(record):
    record["weight_gb_per_s"] = record["weight_mb"] / record["ms"]  # MB per ms


def run_phase(p, phase):
    if p.get("device") == "cuda":
        return run_cuda_phase(p)
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


# --device cuda


def run_cuda_phase(p):
    import torch
    import torch.nn.functional as F

    import_bpt("bitlinear")
    N, K, M, impl = p["N"], p["K"], p["M"], p["impl"]
    w = torch.randn(N, K, device="cuda") / K**0.5
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    extra = {"weight_mb": (N * ((K + 3) // 4) if impl == "ternary" else 2 * N * K) / 1e6}
    with torch.no_grad():
        if impl == "ternary":
            packed, scale = torch.ops.bpt.ternary_pack(w)
            inputs = (x, packed, scale)

            def fn(x, packed, scale):
                torch.ops.bpt.ternary_linear(x, packed, scale, K)

            # The op's math: absmax int8 tokens times the ternary levels, exact in fp32 here.
            amax = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-5)
            s = torch.full_like(amax, 127.0) / amax  # not 127 / amax: a reciprocal, then a product
            x_q = (x.float() * s).round().clamp(-128, 127)
            want = F.linear(x_q, torch.round(w / scale).clamp(-1, 1)) * (scale / s)
            got = torch.ops.bpt.ternary_linear(x, packed, scale, K).float()
            extra["max_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
        else:
            inputs = (x, w.to(torch.bfloat16))

            def fn(x, w):
                F.linear(x, w)

        ms, peak = measure_cuda(lambda: inputs, fn)
    return ms, peak, extra


def compare(records):
    """--device cuda: every record of a case against F.linear in bf16 (time_vs_torch_bf16)."""
    by_case = defaultdict(dict)
    for r in records:
        if r["params"].get("device") == "cuda":
            by_case[str(sorted(r["params"].items()))][r["impl"]] = r
    for impls in by_case.values():
        base = impls.get("torch-bf16", {}).get("ms")
        for r in impls.values():
            if base and "ms" in r:
                r["time_vs_torch_bf16"] = r["ms"] / base


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, add_args, annotate=annotate, finish=compare)
