"""Random-row reads of one feature bag stored in four HDF5 layouts (features_speed.md).

A bag of N x F standard-normal float32 features is written contiguous, in chunks of 256 and
of 16 rows, and in chunks of 256 rows with gzip level 4. For each: file size, write time,
rows per second of a read of I random rows (sorted ids, as h5py needs them) and of a read of
the whole bag; for the contiguous file also the memory-mapped read `H5FeatureBag` uses.

    python benchmarks/features_speed/layouts.py [--rows 20000] [--dim 2048] [--chunk 5000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def best_of(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000, help="N")
    parser.add_argument("--dim", type=int, default=2048, help="F")
    parser.add_argument("--chunk", type=int, default=5000, help="I: random rows per read")
    args = parser.parse_args()
    n, width, count = args.rows, args.dim, args.chunk
    x = np.random.default_rng(0).standard_normal((n, width), dtype=np.float32)
    ids = np.sort(np.random.default_rng(1).permutation(n)[:count])
    layouts = {
        "contiguous": {},
        "chunks of 256 rows": {"chunks": (256, width)},
        "chunks of 16 rows": {"chunks": (16, width)},
        "chunks of 256 rows, gzip 4": {
            "chunks": (256, width),
            "compression": "gzip",
            "compression_opts": 4,
        },
    }
    print("| layout | MiB | write s | random rows/s | whole-bag rows/s | mapped random rows/s |")
    print("|---|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in layouts.items():
            path = Path(tmp) / "bag.h5"
            start = time.perf_counter()
            with h5py.File(path, "w") as f:
                f.create_dataset("features", data=x, **options)
            written = time.perf_counter() - start
            with h5py.File(path, "r") as f:
                features = f["features"]
                random = count / best_of(lambda d=features: d[ids])
                whole = n / best_of(lambda d=features: d[:])
                offset = features.id.get_offset() if features.chunks is None else None
            mapped = "–"
            if offset is not None:

                def read_mapped(path: Path = path, offset: int = offset) -> np.ndarray:
                    block = np.memmap(path, np.float32, mode="r", offset=offset, shape=(n, width))
                    return block[ids]

                mapped = f"{count / best_of(read_mapped):,.0f}"
            size = os.path.getsize(path) / 2**20
            print(
                f"| {name} | {size:.0f} | {written:.2f} | {random:,.0f} | {whole:,.0f} | {mapped} |"
            )


if __name__ == "__main__":
    main()
