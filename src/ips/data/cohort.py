"""A synthetic slide cohort with a labels table: the own-data pipeline without own data.

``write_synthetic_cohort("cohort", slides=64, size=8192)`` writes::

    cohort/
    ├── labels.csv          path,lesion,split (one row per slide)
    └── slides/
        ├── slide_000.tif   pyramidal BigTIFF (`ips.sources.write_synthetic_slide`)
        └── ...

Half of the slides (``positive``) carry 1 to 3 lesions, small dark regions inside the tissue,
and are labelled ``lesion = 1``; the others have tissue only. The splits are stratified: each
class is divided into train, val and test in the same proportions.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from ips.errors import InputError
from ips.files import atomic_write
from ips.sources import write_synthetic_slide

TASK = "lesion"


def write_synthetic_cohort(
    out: str | os.PathLike,
    *,
    slides: int,
    size: int | tuple[int, int],
    positive: float = 0.5,
    val: float = 0.125,
    test: float = 0.25,
    lesions: tuple[int, int] = (1, 3),
    tile_size: int = 256,
    mpp: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write slides with and without lesions, and ``labels.csv``; returns the table's path.

    Args:
        out: the cohort folder (created).
        slides: how many slides.
        size: level-0 side of every slide, or (width, height).
        positive: share of slides with lesions.
        val, test: shares of each class in the validation and test splits.
        lesions: (fewest, most) lesions of a positive slide.
        tile_size: tile side of the TIFFs.
        mpp: microns per level-0 pixel.
        seed: fixes the cohort.
    """
    width, height = (size, size) if isinstance(size, int) else size
    if slides < 2:
        raise InputError(f"slides must be >= 2, got {slides}")
    if not 0 < positive < 1:
        raise InputError(f"positive must be in (0, 1), got {positive}")
    if val < 0 or test < 0 or val + test >= 1:
        raise InputError(f"val and test must be >= 0 with val + test < 1, got {val} and {test}")
    if not 1 <= lesions[0] <= lesions[1]:
        raise InputError(f"lesions must be (fewest, most) with 1 <= fewest <= most, got {lesions}")
    rng = np.random.default_rng(seed)
    labels = np.zeros(slides, dtype=int)
    labels[: round(slides * positive)] = 1
    rng.shuffle(labels)
    splits = np.empty(slides, dtype=object)
    for label in (0, 1):  # stratified: the same shares of each class in every split
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test, n_val = round(len(members) * test), round(len(members) * val)
        splits[members[:n_test]] = "test"
        splits[members[n_test : n_test + n_val]] = "val"
        splits[members[n_test + n_val :]] = "train"
    out = Path(out)
    folder = out / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", TASK, "split"])
    for i in range(slides):
        name = f"slides/slide_{i:03d}.tif"
        count = int(rng.integers(lesions[0], lesions[1] + 1)) if labels[i] else 0
        write_synthetic_slide(
            out / name,
            width=width,
            height=height,
            tile_size=tile_size,
            mpp=mpp,
            seed=int(rng.integers(2**31)),
            lesions=count,
        )
        writer.writerow([name, int(labels[i]), splits[i]])
    path = out / "labels.csv"
    with atomic_write(path, "w") as fh:
        fh.write(table.getvalue())
    return path
