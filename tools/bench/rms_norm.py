"""rms_norm: bpt.rms_norm vs the plain PyTorch expression (Hugging Face's LlamaRMSNorm),
forward and forward+backward, fp32 and bf16."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, measure  # noqa: E402

PHASES = ("fwd", "fwdbwd")


def cases(args):
    shapes = [(4096, 4096), (16384, 1024)] if args.quick else [(4096, 4096), (16384, 1024), (2048, 8192), (65536, 512)]
    return [
        {"rows": rows, "D": D, "dtype": dtype, "impl": impl}
        for rows, D in shapes
        for dtype in ("float32", "bfloat16")
        for impl in ("bpt", "torch")
    ]


def run_phase(p, phase):
    import torch

    import bpt

    dtype = getattr(torch, p["dtype"])

    def torch_rms_norm(x, w, eps):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    fn = bpt.rms_norm if p["impl"] == "bpt" else torch_rms_norm
    train = phase == "fwdbwd"

    def setup():
        x = torch.randn(p["rows"], p["D"], dtype=dtype, requires_grad=train)
        w = torch.randn(p["D"], dtype=dtype, requires_grad=train)
        return x, w, torch.randn(p["rows"], p["D"], dtype=dtype)

    def step(x, w, g):
        if train:
            x.grad = w.grad = None
            fn(x, w, 1e-6).backward(g)
        else:
            with torch.no_grad():
                fn(x, w, 1e-6)

    return measure(setup, step)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase)
