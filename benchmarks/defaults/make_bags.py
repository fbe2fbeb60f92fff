"""A synthetic multiple-instance set of feature bags: which bags hold a few "lesion" rows.

    python benchmarks/defaults/make_bags.py --out WORKDIR/bags --seed 0

Each bag is an ``.npz`` (``features`` (N, F) float32, ``coords`` (N, 2) int64) with N drawn
from 500..2000; the rows are standard normal, and in a positive bag 1-3 % of them are moved
by ``--shift`` along one fixed direction (the same for the whole set). ``labels.csv`` holds
``slide``, ``lesion`` (0/1, half the bags each) and ``split`` (200 train, 100 test).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64, help="F")
    parser.add_argument("--shift", type=float, default=2.5, help="lesion rows' offset")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    direction = rng.standard_normal(args.dim)
    direction /= np.linalg.norm(direction)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.train + args.test):
        n = int(rng.integers(500, 2001))
        features = rng.standard_normal((n, args.dim)).astype(np.float32)
        lesion = i % 2
        if lesion:
            k = max(1, int(round(n * rng.uniform(0.01, 0.03))))
            start = int(rng.integers(0, n - k + 1))  # one region: neighbouring rows
            features[start : start + k] += (args.shift * direction).astype(np.float32)
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1) * 256
        name = f"bag{i:04d}"
        np.savez(args.out / f"{name}.npz", features=features, coords=coords.astype(np.int64))
        rows.append(
            {"slide": name, "lesion": lesion, "split": "train" if i < args.train else "test"}
        )
    with (args.out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide", "lesion", "split"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
