"""Write tests/data/mnist_tiny.npz: the first 30 training and 10 test digits of each class.

Run from the repository root, with the full MNIST at ../shared/data/mnist.npz (``x`` uint8
(70000, 28, 28) and ``y`` (70000,), rows 0..59999 the official training set)::

    python tests/data/make_mnist_tiny.py

The file has the ``x_train, y_train, x_test, y_test`` layout that `ips.data.mnist.load_mnist`
reads, plus ``train_index`` and ``test_index``: the row of every digit in its official split.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

SOURCE = Path("../shared/data/mnist.npz")
OUT = Path("tests/data/mnist_tiny.npz")
NUM_TRAIN = 60_000  # rows of the official training split in `x, y`
PER_CLASS = {"train": 30, "test": 10}  # digits kept of each of the ten classes


def first_of_each_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Rows of the first `count` digits of each class, in their original order."""
    rows = [np.flatnonzero(labels == digit)[:count] for digit in range(10)]
    return np.sort(np.concatenate(rows))


def save_npz(out: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez_compressed` with a fixed date on every member, so the same arrays give the
    same bytes (and the sha256 in README.md) on every run."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w") as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array))


def main() -> None:
    with np.load(SOURCE, allow_pickle=False) as npz:
        x, y = npz["x"], npz["y"]
    splits = {"train": (x[:NUM_TRAIN], y[:NUM_TRAIN]), "test": (x[NUM_TRAIN:], y[NUM_TRAIN:])}
    arrays = {}
    for split, (images, labels) in splits.items():
        index = first_of_each_class(labels, PER_CLASS[split])
        arrays[f"x_{split}"] = images[index]  # (n, 28, 28) uint8
        arrays[f"y_{split}"] = labels[index]  # (n,) uint8
        arrays[f"{split}_index"] = index.astype(np.int64)  # row in the official split
    save_npz(OUT, arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
