"""ffn: bpt.blockwise_ffn (chunked SwiGLU) vs the unchunked PyTorch expression, forward and
forward+backward, D=1024, hidden=2816 (LLaMA's 8/3 ratio), chunk 2048 tokens.

--quick: T 4k and 16k, fp32 and bf16. full: T 4k, 8k, 16k, 32k.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, measure  # noqa: E402

PHASES = ("fwd", "fwdbwd")
D, HIDDEN, CHUNK = 1024, 2816, 2048


def cases(args):
    lengths = [4096, 16384] if args.quick else [4096, 8192, 16384, 32768]
    return [
        {"T": T, "dtype": dtype, "impl": impl}
        for T in lengths
        for dtype in ("float32", "bfloat16")
        for impl in ("bpt", "unchunked")
    ]


def run_phase(p, phase):
    import torch
    import torch.nn.functional as F

    import bpt  # noqa: F401

    dtype = getattr(torch, p["dtype"])
    train = phase == "fwdbwd"

    def unchunked(x, wg, wu, wd):
        return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T

    def blockwise(x, wg, wu, wd):
        return torch.ops.bpt.blockwise_ffn(x, wg, wu, wd, chunk=CHUNK)

    fn = blockwise if p["impl"] == "bpt" else unchunked

    def setup():
        w = lambda *s: (torch.randn(*s, dtype=dtype) / s[-1] ** 0.5).requires_grad_(train)  # noqa: E731
        x = torch.randn(p["T"], D, dtype=dtype, requires_grad=train)
        return x, w(HIDDEN, D), w(HIDDEN, D), w(D, HIDDEN), torch.randn(p["T"], D, dtype=dtype)

    def step(x, wg, wu, wd, g):
        if train:
            for t in (x, wg, wu, wd):
                t.grad = None
            fn(x, wg, wu, wd).backward(g)
        else:
            with torch.no_grad():
                fn(x, wg, wu, wd)

    return measure(setup, step)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase)
