"""Shared benchmark driver: each case runs in a process of its own, so its peak memory is
its own, and every implementation of a case is timed in the same run, side by side.

A benchmark script defines `cases(args) -> list[dict]` (each dict the case's params plus
"impl"; args.quick and any flags of its own, added by an optional `add_args(parser)`), its
phases (e.g. ("fwd", "fwdbwd")) and `run_phase(params, phase) -> (ms, peak_mb)` (usually
`measure(setup, fn)`), and ends with `main(__file__, cases, PHASES, run_phase[, add_args])`.
Each (case, phase) runs in a fresh process (on a GPU, each case: below). Records written
with --out are a JSON list of
{"bench", "impl", "params", "ms", "peak_mb", "<phase>_ms", "<phase>_peak_mb", "machine"}:

- <phase>_ms: median of repeated runs; ms is the first phase's;
- <phase>_peak_mb: the peak resident memory the phase reached above what its process held
  just before it ran (inputs allocated), read from the kernel's VmHWM after resetting it;
  peak_mb is the largest over the phases.
A phase may return None to mark itself skipped (e.g. naive attention beyond its memory), or
raise Skip(reason) to say why (kept in the record's skip_reasons), or (ms, peak_mb, extra):
extra, a dict of further numbers it measured (e.g. bytes communicated), is copied into the
record as it is.

GPU runs (a script whose flags include --device, run with --device cuda): measure_cuda times
with CUDA events and reads torch's peak allocation, which is reset per phase, so all phases
of a case share one process (a process per phase would start CUDA again for each). Optional
hooks of main: env(params) gives a case's process its environment (e.g. an opt-in kernel read
once per process), and finish(records) adds fields that compare records once all have run.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
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


def measure_cuda(setup, fn, *, min_reps: int = 3, max_reps: int = 30, budget_s: float = 0.5) -> tuple[float, float]:
    """measure's GPU twin. Calls setup() (inputs on the GPU), warms fn(*inputs) up (once, more
    while under 0.2 s and 3 calls: kernel selection, cuDNN plans, the caching allocator's
    blocks), resets torch's peak, then times calls between CUDA events from an idle GPU:
    min_reps timings, more while under budget_s. Calls shorter than 25 ms are timed in runs of
    back-to-back calls lasting about that, so the GPU's queue stays fed as in a model and the
    figure is not one launch's latency. Returns (median ms per call, peak MB that
    torch.cuda.max_memory_allocated reached above what was allocated before the timed calls:
    the inputs and what warm-up keeps, such as cuBLAS workspaces)."""
    import torch

    inputs = setup()
    torch.cuda.synchronize()
    start, calls = time.perf_counter(), 0
    while calls < 3:
        fn(*inputs)
        torch.cuda.synchronize()
        calls += 1
        if time.perf_counter() - start > 0.2:
            break
    per_call_s = (time.perf_counter() - start) / calls
    run = max(1, min(100, int(0.025 / per_call_s)))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        begin.record()
        for _ in range(run):
            fn(*inputs)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / run)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), max(peak, 0.0)


class Skip(Exception):
    """Raised by run_phase: the phase does not run for this case, for the reason given (e.g. an
    SDPA backend that does not take the shapes); the record keeps the reason."""


def require_cuda(bench: str) -> None:
    """Exits with a message unless this Python's torch is a CUDA build that sees a GPU."""
    import torch

    if torch.version.cuda is None:
        why = f"this Python's torch ({torch.__version__}, {sys.executable}) is a CPU build"
    elif not torch.cuda.is_available():
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    else:
        return
    sys.exit(f"{bench}: --device cuda needs a GPU and a CUDA build of torch; {why}")


def import_bpt(bench: str):
    """bpt from this checkout (a GPU machine's own Python may have no bpt.pth); a clear exit
    naming the benchmark where its library is missing or built against another torch."""
    if str(REPO / "python") not in sys.path:
        sys.path.insert(0, str(REPO / "python"))
    try:
        import bpt  # noqa: F401
    except (ImportError, OSError) as e:
        sys.exit(f"{bench}: import bpt failed: {e}\n(on a GPU machine with its own torch: "
                 "BPT_CUDA_PYTHON=python3 make build-cuda)")


def gpu_memory_used_mb():
    """nvidia-smi's memory.used summed over the GPUs, in MiB; None without nvidia-smi. Read from
    outside the process that uses the GPU, whose torch counters cannot be read from there."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True,
                         text=True, timeout=30)
    return sum(float(x) for x in out.stdout.split()) if out.returncode == 0 and out.stdout.split() else None


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


def machine(gpu: bool = False) -> dict:
    """The host; with gpu, also GPU 0 and torch's CUDA version."""
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    host = {
        "cpu": cpu,
        "avx512_bf16": "avx512_bf16" in open("/proc/cpuinfo").read(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        host.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpus=torch.cuda.device_count())
    return host


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
    try:
        result = run_phase(params, phase)
    except Skip as skip:
        return {"skipped": True, "why": str(skip)[:500]}
    if result is None:
        return {"skipped": True}
    return {"ms": result[0], "peak_mb": result[1], "extra": result[2] if len(result) > 2 else {}}


def _run_in_process(script: str, params: dict, phases: list, timeout: float, env: dict | None = None) -> dict:
    """Runs the phases, in order, in one process of their own; returns phase -> result. The child
    prints a JSON line per phase as it finishes, so phases done before a crash keep their results."""
    cmd = [sys.executable, script, "--case", json.dumps(params), "--phase", ",".join(phases)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout * len(phases), env=env)
        stdout, failure = proc.stdout, None
        if proc.returncode != 0:
            failure = (proc.stderr.strip().splitlines() or [f"(exit status {proc.returncode}, no output)"])[-1][:300]
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        failure = f"timed out after {timeout * len(phases):.0f} s"
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result.pop("phase")] = result
    return {phase: results.get(phase, {"error": failure or "(no result)"}) for phase in phases}


def safetensors_numel(path: Path) -> int:
    """Elements of every tensor in a .safetensors file, read from its JSON header."""
    import math

    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def write_records(path: Path, records: list, gpu: bool = False, quiet: bool = False) -> None:
    """The --out file: the records, each with the machine they ran on (and its GPU, with gpu)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    host = machine(gpu)
    path.write_text(json.dumps([{**r, "machine": host} for r in records], indent=1) + "\n")
    if not quiet:
        print(f"wrote {path}")


def main(script: str, cases, phases, run_phase, add_args=None, annotate=None, env=None, finish=None) -> None:
    """annotate(record), if given, adds derived fields (e.g. tokens_per_s) to each record;
    env(params), the environment of that case's process (None: this one's); finish(records),
    fields comparing records, once every case has run."""
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
        params = json.loads(args.case)
        for phase in args.phase.split(","):
            print(json.dumps({"phase": phase, **_child(run_phase, params, phase)}), flush=True)
        return

    gpu = getattr(args, "device", "cpu") == "cuda"
    if gpu:
        require_cuda(bench)
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    from report import print_table

    records, failed = [], False
    for params in cases(args):
        record = {"bench": bench, "impl": params["impl"], "params": {k: v for k, v in params.items() if k != "impl"}}
        groups = [list(phases)] if gpu else [[phase] for phase in phases]
        results = {}
        for group in groups:
            results.update(_run_in_process(script, params, group, args.timeout, env(params) if env else None))
        for phase in phases:
            result = results[phase]
            if "error" in result:
                print(f"{bench}: {params} {phase} failed: {result['error']}", file=sys.stderr)
                record["error"] = result["error"]
                failed = True
            elif "skipped" in result:
                record.setdefault("skipped", []).append(phase)
                if "why" in result:
                    record.setdefault("skip_reasons", {})[phase] = result["why"]
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
        if "skip_reasons" in record:
            shown += "".join(f"; {p} skipped: {why[:200]}" for p, why in record["skip_reasons"].items())
        print(f"  {record['impl']:>9} {json.dumps(record['params'])}: {shown}", flush=True)
        if gpu and args.out:  # what has run so far survives a run cut short (the GPU named at the end)
            write_records(args.out, records, quiet=True)

    if finish:
        finish(records)
    if args.out:
        write_records(args.out, records, gpu)
    print_table(records)
    if failed:
        sys.exit(1)
