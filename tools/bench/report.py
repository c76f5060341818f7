"""Prints benchmark records (the JSON files tools/bench/*.py write) as tables: one row per
case and implementation, each time and peak with its ratio to the PyTorch baseline of the
same case.

    .venv/bin/python tools/bench/report.py bench-results/*.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

# The implementation each benchmark compares against (first found in a case).
BASELINES = ("torch", "sdpa", "unfused", "unchunked", "vanilla", "hf-sdpa", "torch-fsdp2", "llama-fp32", "torch-lora",
             "torch-loop")


def _num(v):
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _cell(record, key, base):
    """'12.3 (0.45x)': the value and its ratio to the baseline's."""
    if record is None or key not in record:
        return "skipped" if record and "skipped" in record else (record or {}).get("error", "-")[:40]
    v = record[key]
    if not isinstance(v, (int, float)):
        return str(v)
    if base is not None and base is not record and isinstance(base.get(key), (int, float)) and base[key] > 0:
        return f"{_num(v)} ({v / base[key]:.2f}x)"
    return _num(v)


def table_lines(records, markdown=False):
    """One table per benchmark: a row per (case, implementation); each time and peak with its
    ratio to the baseline implementation of the same case."""
    lines = []
    groups = defaultdict(dict)  # (bench, params) -> impl -> record
    for r in records:
        groups[(r["bench"], json.dumps(r["params"]))][r["impl"]] = r
    for bench in dict.fromkeys(b for b, _ in groups):
        keys = [k for k in groups if k[0] == bench]
        impls = list(dict.fromkeys(i for k in keys for i in groups[k]))
        base_impl = next((b for b in BASELINES if b in impls), None)
        metrics = list(dict.fromkeys(
            m for k in keys for r in groups[k].values() for m in r
            if m != "peak_mb" and (m.endswith(("_ms", "_mb", "_per_s")) or m.startswith(("max_", "comm_", "mfu"))
                                   or "_vs_" in m)))
        metrics = [m for m in metrics if m.endswith("_ms")] + [m for m in metrics if not m.endswith("_ms")]
        header = ["params", "impl"] + metrics
        body = []
        for k in keys:
            base = groups[k].get(base_impl)
            params = ", ".join(f"{n}={v}" for n, v in json.loads(k[1]).items())
            for impl in impls:
                if impl in groups[k]:
                    body.append([params, impl] + [_cell(groups[k][impl], m, base) for m in metrics])
        title = f"{bench} (ratios against {base_impl})" if base_impl else bench
        if markdown:
            lines += [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in body]
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *body)]
            lines += [f"\n{title}", "  ".join(h.ljust(w) for h, w in zip(header, widths))]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return lines


def print_table(records, markdown=False):
    print("\n".join(table_lines(records, markdown)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--markdown", action="store_true", help="Markdown tables, for docs/BENCHMARKS.md")
    args = parser.parse_args()
    records = [r for f in args.files for r in json.loads(f.read_text())]
    if records and "machine" in records[0]:
        m = records[0]["machine"]
        gpu = f", {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ""
        print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']} ({m['cpu_capability']}){gpu}, "
              f"{m['date']}")
    print_table(records, args.markdown)


if __name__ == "__main__":
    main()
