"""attention: bpt.blockwise_attention vs torch's scaled_dot_product_attention (its CPU
flash kernel) vs naive math attention (materialised [T, T] scores), forward and
forward+backward, B=1, Hq=8, D=128.

--quick: T 1k, 2k, 4k, Hkv 8, fp32 and bf16, causal and not (about 3 minutes).
full:    T 1k .. 32k, Hkv 8 and 2; --t, --hkv, --causal pick a part of it. Naive
         attention is skipped where its scores alone would pass 6 GiB.

--device cuda (a GPU, a CUDA torch and `make build-cuda`): causal, bf16, B=1, D=128, Hq=16
with Hkv 16 and 4 (GQA), T 2k .. 32k (--quick: 1k and 2k; --t, --hkv and --impl pick a part).
Implementations, side by side in each case:
  bpt               blockwise_attention (q and k chunk --chunk, 256) with its default CUDA
                    path, the generic ATen blocks;
  bpt-tiled         the same in a process with BPT_CUDA_ATTENTION=tiled: the tiled
                    tensor-core forward and backward;
  bpt-packed        as bpt with segment_ids: two documents of T/2 packed in the row, against
                    its unpacked twin (<phase>_time_vs_unpacked); bpt-tiled-packed, the same
                    for bpt-tiled, runs only when --impl names it (every case is a process
                    that starts CUDA: a few seconds each);
  sdpa-flash, sdpa-cudnn, sdpa-efficient
                    F.scaled_dot_product_attention(is_causal=True) under
                    sdpa_kernel(FLASH_ATTENTION / CUDNN_ATTENTION / EFFICIENT_ATTENTION). For
                    GQA each first tries enable_gqa=True; a backend that refuses it runs with K
                    and V repeated to Hq heads inside the timed call (repeat_interleave, its
                    time and memory counted); the record's <phase>_gqa says which ran. A
                    backend that raises for a case is recorded as skipped, with the reason
                    (skip_reasons: torch's warnings and error).
Times are the median of calls between CUDA events after warm-up (common.measure_cuda);
<phase>_peak_mb is torch.cuda.max_memory_allocated after a reset, above what the inputs (and
warm-up's workspaces) hold. TFLOP/s (<phase>_tflop_per_s) count FlashAttention's benchmark
convention for causal attention: forward 4 B Hq T^2 D / 2, backward 2.5 times the forward,
so forward+backward 3.5 times; packed cases count the work of their two documents, half that.
Every time and peak is also given against the fastest SDPA backend of the case and phase
(<phase>_time_vs_best_sdpa, <phase>_peak_vs_best_sdpa; <phase>_best_sdpa names it). bpt's
forward is checked against SDPA on the same inputs (max_abs_err, packed: each document alone),
and bpt-tiled's profiled for its kernels (<phase>_tiled_kernel_ran: the tiled forward, and for
fwdbwd the tiled backward too; false: the op fell back to the generic blocks, and the run
says so).
"""

import math
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Skip, import_bpt, main, measure, measure_cuda  # noqa: E402

PHASES = ("fwd", "fwdbwd")
Q_CHUNK = K_CHUNK = 256
NAIVE_MAX_SCORE_BYTES = 6 << 30
CUDA_IMPLS = ("bpt", "bpt-tiled", "bpt-packed", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
CUDA_EXTRA_IMPLS = ("bpt-tiled-packed",)  # only when --impl names them
CUDA_HEADS, CUDA_D = 16, 128


def add_args(parser):
    """--t, --hkv and --causal narrow the full grid (e.g. --t 32768 --hkv 8 --causal yes)."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--t", type=int, nargs="+", help="default 1k .. 32k (cuda: 2k .. 32k)")
    parser.add_argument("--hkv", type=int, nargs="+", help="default 8 2 (cuda: 16 4, with Hq 16)")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--impl", nargs="+", choices=CUDA_IMPLS + CUDA_EXTRA_IMPLS,
                        help="cuda: these implementations only")
    parser.add_argument("--chunk", type=int, default=Q_CHUNK, help="cuda: bpt's q and k chunk")


def cases(args):
    if args.device == "cuda":
        return cuda_cases(args)
    lengths = [1024, 2048, 4096] if args.quick else args.t or [1024, 2048, 4096, 8192, 16384, 32768]
    kv_heads = [8] if args.quick else args.hkv or [8, 2]
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
    if p.get("device") == "cuda":
        return run_cuda_phase(p, phase)
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


# --device cuda


def cuda_cases(args):
    import_bpt("attention")  # here, once, rather than a failure in every case
    lengths = [1024, 2048] if args.quick else args.t or [2048, 4096, 8192, 16384, 32768]
    return [
        {"device": "cuda", "T": T, "Hq": CUDA_HEADS, "Hkv": hkv, "causal": True, "dtype": "bfloat16",
         "chunk": args.chunk, "impl": impl}
        for T in lengths
        for hkv in args.hkv or [CUDA_HEADS, 4]
        for impl in args.impl or CUDA_IMPLS
    ]


def case_env(p):
    """bpt-tiled*: a process with BPT_CUDA_ATTENTION=tiled (read once per process); every other
    case without it."""
    if p.get("device") != "cuda":
        return None
    env = {k: v for k, v in os.environ.items() if k != "BPT_CUDA_ATTENTION"}
    if p["impl"].startswith("bpt-tiled"):
        env["BPT_CUDA_ATTENTION"] = "tiled"
    return env


def attention_flops(p, phase):
    """Causal attention FLOPs (FlashAttention's benchmark convention, see the docstring)."""
    T, docs = p["T"], 2 if p["impl"].endswith("-packed") else 1
    forward = 4 * p["Hq"] * CUDA_D * (T // docs) ** 2 / 2 * docs  # B = 1
    return forward if phase == "fwd" else 3.5 * forward


def run_cuda_phase(p, phase):
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import_bpt("attention")
    impl, T, Hq, Hkv, D, chunk = p["impl"], p["T"], p["Hq"], p["Hkv"], CUDA_D, p["chunk"]
    if (os.environ.get("BPT_CUDA_ATTENTION") == "tiled") != impl.startswith("bpt-tiled"):
        raise RuntimeError(f"{impl} ran with BPT_CUDA_ATTENTION={os.environ.get('BPT_CUDA_ATTENTION')}")
    dtype, device, train = getattr(torch, p["dtype"]), torch.device("cuda"), phase == "fwdbwd"
    packed = impl.endswith("-packed")
    segment_ids = (torch.arange(T, device=device) >= T // 2).long().unsqueeze(0) if packed else None
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    gqa = "none"  # sdpa: "enable_gqa" or "repeat_kv" for Hkv < Hq

    def bpt_attention(q, k, v):
        return torch.ops.bpt.blockwise_attention(q, k, v, causal=True, q_chunk=chunk, k_chunk=chunk,
                                                 segment_ids=segment_ids)[0]

    def sdpa(q, k, v):
        if gqa == "repeat_kv":
            k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        with sdpa_kernel(backends[impl]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa == "enable_gqa")

    fn = sdpa if impl in backends else bpt_attention

    def step(q, k, v, g):
        if train:  # the gradients are dropped after the call, so the peak counts them
            fn(q, k, v).backward(g)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)

    make = lambda h: torch.randn(1, h, T, D, dtype=dtype, device=device, requires_grad=train)  # noqa: E731
    inputs = make(Hq), make(Hkv), make(Hkv), torch.randn(1, Hq, T, D, dtype=dtype, device=device)

    if impl in backends:  # which way it runs, if at all: one call on the case's inputs
        reasons = []
        for gqa in ("enable_gqa", "repeat_kv") if Hkv != Hq else ("none",):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    step(*inputs)
                    torch.cuda.synchronize()
                    break
                except Exception as e:  # noqa: BLE001 (any refusal is the backend's, recorded)
                    said = [str(w.message).strip() for w in caught] + [(str(e).strip() or repr(e)).splitlines()[0]]
                    reasons.append(f"{gqa}: " + " | ".join(dict.fromkeys(said)))
                    for x in inputs[:3]:
                        x.grad = None
                    torch.cuda.empty_cache()
        else:
            raise Skip("; ".join(reasons))

    ms, peak = measure_cuda(lambda: inputs, step)
    extra = {f"{phase}_tflop_per_s": attention_flops(p, phase) / (ms * 1e-3) / 1e12}
    if impl in backends and Hkv != Hq:
        extra[f"{phase}_gqa"] = gqa
    if phase == "fwd" and impl not in backends:
        extra["max_abs_err"] = forward_error(bpt_attention, inputs[:3], segment_ids is not None)
    if impl.startswith("bpt-tiled"):
        extra[f"{phase}_tiled_kernel_ran"] = tiled_kernel_ran(step, inputs, train)
    return ms, peak, extra


def tiled_kernel_ran(step, inputs, train):
    """Whether the phase ran attention_forward_tiled (and attention_backward_tiled with train):
    the op falls back to the generic blocks where the card or the shapes do not suit the
    kernels. None where the profiler fails."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    kernels = ("attention_forward_tiled", "attention_backward_tiled") if train else ("attention_forward_tiled",)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            step(*inputs)
            torch.cuda.synchronize()
        names = [event.name for event in trace.events()]
        return all(any(kernel in name for name in names) for kernel in kernels)
    except Exception:  # noqa: BLE001 (a profiler without CUPTI: unknown, not an error)
        return None


def forward_error(bpt_attention, inputs, packed):
    """Largest |bpt - SDPA| of the forward on the case's inputs; packed: each half alone. None
    where no fused SDPA backend runs (math would materialise T x T scores)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (x.detach() for x in inputs)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    T = q.shape[2]
    spans = [(0, T // 2), (T // 2, T)] if packed else [(0, T)]
    with torch.no_grad():
        got = bpt_attention(q, k, v)
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        try:
            with sdpa_kernel(fused):
                want = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                 is_causal=True) for a, b in spans], 2)
        except RuntimeError:
            return None
        return (got.float() - want.float()).abs().max().item()


def compare(records):
    """Per case and phase: each record against the fastest SDPA backend that ran, and packed
    bpt against unpacked."""
    if not records or records[0]["params"].get("device") != "cuda":
        return
    by_case = defaultdict(dict)
    for r in records:
        by_case[str(sorted(r["params"].items()))][r["impl"]] = r
    for impls in by_case.values():
        for phase in PHASES:
            ms, peak = f"{phase}_ms", f"{phase}_peak_mb"
            ran = {impl: r for impl, r in impls.items() if ms in r}
            sdpa = [r for impl, r in ran.items() if impl.startswith("sdpa")]
            if sdpa:
                best = min(sdpa, key=lambda r: r[ms])
                for r in ran.values():
                    r[f"{phase}_best_sdpa"] = best["impl"]
                    r[f"{phase}_time_vs_best_sdpa"] = r[ms] / best[ms]
                    if best[peak] > 0:
                        r[f"{phase}_peak_vs_best_sdpa"] = r[peak] / best[peak]
            for impl, r in ran.items():
                twin = ran.get(impl.removesuffix("-packed"))
                if impl.endswith("-packed") and twin:
                    r[f"{phase}_time_vs_unpacked"] = r[ms] / twin[ms]
    untiled = sorted({r["params"]["T"] for r in records for phase in PHASES
                      if r.get(f"{phase}_tiled_kernel_ran") is False})
    if untiled:
        print(f"attention: bpt-tiled ran the generic blocks, not the tiled kernels, at T = {untiled}: its rows "
              "are the generic path's")


if __name__ == "__main__":
    main(__file__, cases, PHASES, run_phase, add_args, env=case_env, finish=compare)
