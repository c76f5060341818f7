"""Prints benchmark records (the JSON files tools/bench/*.py write) as tables: one row per
case, one column group per implementation, and each time and peak as a ratio to the
PyTorch baseline of the same case.

    .venv/bin/python tools/bench/report.py bench-results/*.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

# The implementation each benchmark compares against (first found in a case).
BASELINES = ("torch", "sdpa", "unfused", "unchunked", "full", "vanilla")
TIME_KEYS = ("ms", "fwd_ms", "fwdbwd_ms")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if v < 100 else f"{v:.1f}"
    return str(v)


def rows_of(records):
    """Groups records by (bench, params) -> {impl: record}."""
    groups = defaultdict(dict)
    for r in records:
        key = (r["bench"], json.dumps(r["params"], sort_keys=True))
        groups[key][r["impl"]] = r
    return groups


def table_lines(records, markdown=False):
    lines = []
    groups = rows_of(records)
    benches = sorted({b for b, _ in groups})
    for bench in benches:
        keys = [k for k in groups if k[0] == bench]
        impls = sorted({i for k in keys for i in groups[k]})
        base = next((b for b in BASELINES if b in impls), impls[0])
        others = [i for i in impls if i != base]
        time_keys = [t for t in TIME_KEYS[1:] if any(t in r for k in keys for r in groups[k].values())] or ["ms"]
        header = ["params"] + [f"{base} {t}" for t in time_keys] + [f"{base} peak_mb"]
        for i in others:
            header += [f"{i} {t}" for t in time_keys] + [f"{i}/{base} {t}" for t in time_keys]
            header += [f"{i} peak_mb", f"{i}/{base} peak"]
        body = []
        for k in keys:
            g = groups[k]
            row = [", ".join(f"{n}={v}" for n, v in json.loads(k[1]).items())]
            b = g.get(base, {})
            row += [_fmt(b.get(t, "-")) for t in time_keys] + [_fmt(b.get("peak_mb", "-"))]
            for i in others:
                r = g.get(i, {})
                row += [_fmt(r.get(t, r.get("error", "-"))) for t in time_keys]
                row += [_fmt(r[t] / b[t]) if t in r and b.get(t) else "-" for t in time_keys]
                row += [_fmt(r.get("peak_mb", "-"))]
                row += [_fmt(r["peak_mb"] / b["peak_mb"]) if "peak_mb" in r and b.get("peak_mb") else "-"]
            body.append(row)
        lines.append(f"\n{bench}" if not markdown else f"\n### {bench}\n")
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(r) + " |" for r in body]
        else:
            widths = [max(len(x) for x in col) for col in zip(header, *body)]
            lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths)))
            lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
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
        print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']} ({m['cpu_capability']}), {m['date']}")
    print_table(records, args.markdown)


if __name__ == "__main__":
    main()
