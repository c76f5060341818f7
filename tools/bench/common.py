"""Shared benchmark driver: each case runs in a process of its own, so its peak memory is
its own, and every implementation of a case is timed in the same run, side by side.

A benchmark script defines `cases(quick) -> list[dict]` (each dict the case's params plus
"impl") and `run_case(params) -> dict` (timings in ms, measured with `time_ms`), and ends
with `main(__file__, cases, run_case)`. Records written with --out are a JSON list of
{"bench", "impl", "params", "ms", "peak_mb", "machine", ...extra timings}:

- ms: median of repeated runs (the case's headline time, e.g. forward);
- peak_mb: the peak resident memory the case reached above what the process held just
  before it ran (inputs already allocated), read from the kernel's VmHWM after resetting it.
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
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _run_one_case(bench: str, run_case, params: dict) -> dict:
    """In the child: run the case, return its record."""
    import torch

    torch.manual_seed(0)
    result = run_case(params)
    params = {k: v for k, v in params.items() if k != "impl"}
    return {"bench": bench, "impl": result.pop("impl"), "params": params, **result}


def measure(setup, fn) -> tuple[float, float]:
    """Calls setup() (inputs), then resets the peak mark, then times fn(*inputs).
    Returns (median ms, peak MB above the RSS held with inputs allocated)."""
    inputs = setup()
    base = reset_peak_memory()
    fn(*inputs)  # the first call's peak counts, as a training step's would
    peak = peak_memory_mb() - base
    ms = time_ms(lambda: fn(*inputs))
    return ms, max(peak, 0.0)


def main(script: str, cases, run_case) -> None:
    bench = Path(script).stem
    parser = argparse.ArgumentParser(description=f"bpt benchmark: {bench}")
    parser.add_argument("--quick", action="store_true", help="a few small cases (well under 3 minutes)")
    parser.add_argument("--out", type=Path, help="write the records as JSON to this file")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per case")
    args = parser.parse_args()

    if args.case is not None:
        print(json.dumps(_run_one_case(bench, run_case, json.loads(args.case))))
        return

    sys.path.insert(0, str(REPO / "tools" / "bench"))
    from report import print_table

    records = []
    for params in cases(args.quick):
        cmd = [sys.executable, script, "--case", json.dumps(params)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{bench}: case {params} timed out after {args.timeout:.0f} s", file=sys.stderr)
            records.append({"bench": bench, "impl": params.get("impl"), "params": params, "error": "timeout"})
            continue
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{bench}: case {params} failed: {last}", file=sys.stderr)
            records.append({"bench": bench, "impl": params.get("impl"), "params": params, "error": last})
            continue
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        records.append(record)
        print(f"  {record['impl']:>12} {json.dumps(record['params'])}: {record['ms']:.3f} ms", flush=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        host = machine()
        args.out.write_text(json.dumps([{**r, "machine": host} for r in records], indent=1) + "\n")
        print(f"wrote {args.out}")
    print_table(records)
    if any("error" in r for r in records):
        sys.exit(1)

