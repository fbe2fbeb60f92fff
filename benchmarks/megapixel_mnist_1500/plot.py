"""Validation accuracy per task against training time, one line per run.

    python benchmarks/megapixel_mnist_1500/plot.py --out curve.png \
        "CPU recipe=runs/cpu/metrics.csv" "paper config=runs/paper/metrics.csv"

Each argument is LABEL=metrics.csv of an `ips train` run folder, or LABEL=a.csv+b.csv for a
run in stages (b started from a's weights): b's training time is counted from the end of a's.
The dashed lines are the last-epoch test figures of a public GPU re-run of the official
configuration (150 epochs).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [  # (column of metrics.csv, title, anchor: last epoch of the GPU re-run)
    ("val_majority/accuracy", "majority", 0.991),
    ("val_max/accuracy", "max", 0.937),
    ("val_top/accuracy", "top", 0.927),
    ("val_multi/exact_match", "multi-label (exact match)", 0.819),
]


def read(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as fh:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(fh)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=metrics.csv or LABEL=stage1.csv+stage2.csv")
    parser.add_argument("--out", required=True, help="the .png to write")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.6), sharey=True)
    for run in args.runs:
        label, paths = run.split("=", 1)
        rows, minutes, offset = [], [], 0.0
        for path in paths.split("+"):
            stage = read(Path(path))
            rows += stage
            minutes += [(offset + r["elapsed_s"]) / 60 for r in stage]
            offset += stage[-1]["elapsed_s"]
        for ax, (column, _, _) in zip(axes, PANELS, strict=True):
            ax.plot(minutes, [r[column] for r in rows], marker=".", label=label)
    for ax, (_, title, anchor) in zip(axes, PANELS, strict=True):
        ax.axhline(anchor, color="grey", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
