"""loss: bpt.chunked_lm_loss (LM head + cross-entropy over 1024-token chunks) vs the unfused
PyTorch expression cross_entropy(h @ w_head.T, targets), forward and forward+backward, D=512.

--quick: vocab 32000, T 2k and 8k, fp32. full: vocab 32000 and 128256, T 2k, 8k, 16k, fp32
and bf16. The unfused case is skipped where its logits alone would pass 4 GiB.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main, measure  # noqa: E402

PHASES = ("fwd", "fwdbwd")
D, CHUNK = 512, 1024
UNFUSED_MAX_LOGIT_BYTES = 4 << 30


def cases(args):
    if args.quick:
        grid = [(32000, T, "float32") for T in (2048, 8192)]
    else:
        grid = [(V, T, dt) for V in (32000, 128256) for T in (2048, 8192, 16384) for dt in ("float32", "bfloat16")]
    return [{"V": V, "T": T, "dtype": dt, "impl": impl} for V, T, dt in grid for impl in ("bpt", "unfused")]


def run_phase(p, phase):
    import torch
    import torch.nn.functional as F

    import bpt  # noqa: F401

    dtype = getattr(torch, p["dtype"])
    V, T = p["V"], p["T"]
    if p["impl"] == "unfused" and T * V * 4 > UNFUSED_MAX_LOGIT_BYTES:
        return None
    train = phase == "fwdbwd"

    def unfused(h, w, t):
        return F.cross_entropy((h @ w.T).float(), t)

    def chunked(h, w, t):
        return torch.ops.bpt.chunked_lm_loss(h, w, t, chunk=CHUNK)[0]

    fn = chunked if p["impl"] == "bpt" else unfused

    def setup():
        h = torch.randn(T, D, dtype=dtype, requires_grad=train)
        w = (torch.randn(V, D, dtype=dtype) / D**0.5).requires_grad_(train)
        return h, w, torch.randint(0, V, (T,))

    def step(h, w, t):
        if train:
            h.grad = w.grad = None
            fn(h, w, t).backward()
        else:
            with torch.no_grad():
                fn(h, w, t)

    return measure(setup, step)


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase)
