"""A small CAMELYON16 folder of synthetic slides, for the tests (not part of the library)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ips.data.camelyon16 import write_asap_xml
from ips.files import atomic_write
from ips.sources import write_synthetic_slide


def write_synthetic_camelyon16(
    root: str | os.PathLike,
    *,
    normal: int = 3,
    tumor: int = 3,
    test_normal: int = 2,
    test_tumor: int = 2,
    size: int = 1024,
    lesions: int = 3,
    tile_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a small folder in the CAMELYON16 layout from synthetic pyramidal slides
    (`ips.sources.write_synthetic_slide`): tumour slides carry `lesions` darker lesion regions
    with matching ASAP XML annotations, normal slides none; the test labels go to
    ``testing/reference.csv``.

    Args:
        root: the folder to fill (created).
        normal, tumor: training slides of each kind.
        test_normal, test_tumor: test slides of each kind (named test_001, ... in a shuffled
            order, so names do not give labels away).
        size: level-0 width and height of every slide.
        lesions: lesion regions per tumour slide.
        tile_size: TIFF tile side.
        seed: fixes every picture and the test order.

    Returns:
        `root`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    test_labels = rng.permutation([0] * test_normal + [1] * test_tumor).tolist()
    plan = [("training/normal", f"normal_{i + 1:03d}", 0) for i in range(normal)]
    plan += [("training/tumor", f"tumor_{i + 1:03d}", 1) for i in range(tumor)]
    plan += [("testing/images", f"test_{i + 1:03d}", y) for i, y in enumerate(test_labels)]
    rows = []
    for k, (folder, name, label) in enumerate(plan):
        (root / folder).mkdir(parents=True, exist_ok=True)
        slide = write_synthetic_slide(
            root / folder / f"{name}.tif",
            width=size,
            height=size,
            tile_size=tile_size,
            seed=seed * 10_007 + k,
            lesions=lesions if label else 0,
        )
        if label:
            split = "training" if folder.startswith("training") else "testing"
            write_asap_xml(
                root / split / "lesion_annotations" / f"{name}.xml", slide.lesion_polygons
            )
        if folder == "testing/images":
            rows.append(f"{name},{'Tumor' if label else 'Normal'}\n")
    if rows:
        with atomic_write(root / "testing" / "reference.csv", "w") as fh:
            fh.writelines(rows)
    return root
