"""rms_norm: bpt.rms_norm vs the plain PyTorch expression (Hugging Face's LlamaRMSNorm),
forward and forward+backward, fp32 and bf16."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, measure  # noqa: E402


def cases(quick):
    shapes = [(4096, 4096), (16384, 1024)] if quick else [(4096, 4096), (16384, 1024), (2048, 8192), (65536, 512)]
    return [
        {"rows": rows, "D": D, "dtype": dtype, "impl": impl}
        for rows, D in shapes
        for dtype in ("float32", "bfloat16")
        for impl in ("bpt", "torch")
    ]


def run_case(p):
    import torch

    import bpt

    dtype = getattr(torch, p["dtype"])

    def torch_rms_norm(x, w, eps):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    fn = bpt.rms_norm if p["impl"] == "bpt" else torch_rms_norm

    def inputs(requires_grad):
        x = torch.randn(p["rows"], p["D"], dtype=dtype, requires_grad=requires_grad)
        w = torch.randn(p["D"], dtype=dtype, requires_grad=requires_grad)
        return x, w, torch.randn(p["rows"], p["D"], dtype=dtype)

    def forward(x, w, g):
        with torch.no_grad():
            fn(x, w, 1e-6)

    def forward_backward(x, w, g):
        fn(x, w, 1e-6).backward(g)

    fwd_ms, fwd_peak = measure(lambda: inputs(False), forward)
    fwdbwd_ms, fwdbwd_peak = measure(lambda: inputs(True), forward_backward)
    return {"impl": p["impl"], "ms": fwd_ms, "fwd_ms": fwd_ms, "fwdbwd_ms": fwdbwd_ms,
            "peak_mb": max(fwd_peak, fwdbwd_peak), "fwd_peak_mb": fwd_peak, "fwdbwd_peak_mb": fwdbwd_peak}


if __name__ == "__main__":
    main(__file__, cases, run_case)
