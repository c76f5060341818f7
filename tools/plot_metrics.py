"""Draws a bpt-train run's metrics.jsonl as a PNG: training (and evaluation) loss, and
throughput, against the step.

    .venv/bin/python tools/plot_metrics.py runs/demo/metrics.jsonl --out runs/demo/metrics.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="metrics.jsonl written by bpt-train")
    parser.add_argument("--out", type=Path, help="PNG to write (default: next to the metrics)")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        raise SystemExit(f"{args.metrics}: no training records")
    # A resumed run appends: keep the last record of each step.
    train = list({r["step"]: r for r in train}.values())

    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    speed_ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    speed_ax.grid(alpha=0.3)
    fig.suptitle(str(args.metrics.parent))
    out = args.out or args.metrics.with_name("metrics.png")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"plot_metrics: {out}")


if __name__ == "__main__":
    main()
