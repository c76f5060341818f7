"""Shared benchmark driver: each case runs in a process of its own, so its peak memory is
its own, and every implementation of a case is timed in the same run, side by side.

A benchmark script defines `cases(args) -> list[dict]` (each dict the case's params plus
"impl"; args.quick and any flags of its own, added by an optional `add_args(parser)`), its
phases (e.g. ("fwd", "fwdbwd")) and `run_phase(params, phase) -> (ms, peak_mb)` (usually
`measure(setup, fn)`), and ends with `main(__file__, cases, PHASES, run_phase[, add_args])`.
Each (case, phase) runs in a fresh process. Records written with --out are a JSON list of
{"bench", "impl", "params", "ms", "peak_mb", "<phase>_ms", "<phase>_peak_mb", "machine"}:

- <phase>_ms: median of repeated runs; ms is the first phase's;
- <phase>_peak_mb: the peak resident memory the phase reached above what its process held
  just before it ran (inputs allocated), read from the kernel's VmHWM after resetting it;
  peak_mb is the largest over the phases.
A phase may return None to mark itself skipped (e.g. naive attention beyond its memory), or
(ms, peak_mb, extra): extra, a dict of further numbers it measured (e.g. bytes communicated),
is copied into the record as it is.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def reset_peak_memory() -> float:
    """Resets the peak-RSS mark (Linux clear_refs 5); returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") / 1024


def peak_memory_mb() -> float:
    return _status_kb("VmHWM") / 1024


def time_ms(fn, *, min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0, warmup: int = 2) -> float:
    """Median wall time of fn() in ms: at least min_reps runs, more while under budget_s."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def hf_training_ms(model, rows: int, T: int, steps: int, warmup: int, seed: int = 0) -> float:
    """Median ms of a transformers causal LM's training step (random tokens of (rows, T); loss,
    backward, clip_grad_norm_ 1.0, torch.optim.AdamW as llamabpt sets it) after `warmup` steps."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (rows, T), generator=tokens)
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[warmup:])


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "avx512_bf16": "avx512_bf16" in open("/proc/cpuinfo").read(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def measure(setup, fn) -> tuple[float, float]:
    """Calls setup() (inputs), resets the peak mark, then runs fn(*inputs): the first call's
    peak is the phase's peak (as a training step's would be) and doubles as warm-up.
    Returns (median ms, peak MB above the RSS held with inputs allocated)."""
    inputs = setup()
    base = reset_peak_memory()
    t0 = time.perf_counter()
    fn(*inputs)
    first_s = time.perf_counter() - t0
    peak = peak_memory_mb() - base
    # Long calls are timed fewer times: the median of 3, or the one call past 10 s.
    if first_s > 10:
        ms = first_s * 1e3
    elif first_s > 1:
        ms = time_ms(lambda: fn(*inputs), min_reps=3, max_reps=3, warmup=0)
    else:
        ms = time_ms(lambda: fn(*inputs), warmup=1)
    return ms, max(peak, 0.0)


def _child(run_phase, params: dict, phase: str) -> dict:
    import torch

    torch.manual_seed(0)
    result = run_phase(params, phase)
    if result is None:
        return {"skipped": True}
    return {"ms": result[0], "peak_mb": result[1], "extra": result[2] if len(result) > 2 else {}}


def _run_in_process(script: str, params: dict, phase: str, timeout: float) -> dict:
    cmd = [sys.executable, script, "--case", json.dumps(params), "--phase", phase]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        return {"error": lines[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def safetensors_numel(path: Path) -> int:
    """Elements of every tensor in a .safetensors file, read from its JSON header."""
    import math

    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def write_records(path: Path, records: list) -> None:
    """The --out file: the records, each with the machine they ran on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    host = machine()
    path.write_text(json.dumps([{**r, "machine": host} for r in records], indent=1) + "\n")
    print(f"wrote {path}")


def main(script: str, cases, phases, run_phase, add_args=None, annotate=None) -> None:
    """annotate(record), if given, adds derived fields (e.g. tokens_per_s) to each record."""
    bench = Path(script).stem
    parser = argparse.ArgumentParser(description=f"bpt benchmark: {bench}")
    parser.add_argument("--quick", action="store_true", help="a few small cases (well under 3 minutes)")
    parser.add_argument("--out", type=Path, help="write the records as JSON to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per case and phase")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case ...
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # ... and phase in this process
    if add_args:
        add_args(parser)
    args = parser.parse_args()

    if args.case is not None:
        print(json.dumps(_child(run_phase, json.loads(args.case), args.phase)))
        return

    sys.path.insert(0, str(REPO / "tools" / "bench"))
    from report import print_table

    records, failed = [], False
    for params in cases(args):
        record = {"bench": bench, "impl": params["impl"], "params": {k: v for k, v in params.items() if k != "impl"}}
        for phase in phases:
            result = _run_in_process(script, params, phase, args.timeout)
            if "error" in result:
                print(f"{bench}: {params} {phase} failed: {result['error']}", file=sys.stderr)
                record["error"] = result["error"]
                failed = True
            elif "skipped" in result:
                record.setdefault("skipped", []).append(phase)
            else:
                record[f"{phase}_ms"] = result["ms"]
                record[f"{phase}_peak_mb"] = result["peak_mb"]
                record.update(result["extra"])
        done = [p for p in phases if f"{p}_ms" in record]
        if done:
            record["ms"] = record[f"{done[0]}_ms"]
            record["peak_mb"] = max(record[f"{p}_peak_mb"] for p in done)
            if annotate:
                annotate(record)
        records.append(record)
        shown = ", ".join(f"{p} {record[f'{p}_ms']:.2f} ms" for p in done) or "skipped"
        print(f"  {record['impl']:>9} {json.dumps(record['params'])}: {shown}", flush=True)

    if args.out:
        write_records(args.out, records)
    print_table(records)
    if failed:
        sys.exit(1)
