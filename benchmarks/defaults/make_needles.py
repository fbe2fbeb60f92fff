"""A needle-in-a-haystack photo set: which 1024 x 1024 photos hold one short bright stroke.

    python benchmarks/defaults/make_needles.py --out WORKDIR/needles --seed 0

Backgrounds are smooth colour noise (no two patches alike); in half of the photos one stroke
of 24-40 px, 3 px wide, is drawn at a random place and angle. ``labels.csv`` holds ``path``,
``needle`` (yes/no) and ``split`` (216 train, 24 val, 120 test), for ``data.dataset: table``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def photo(rng: np.random.Generator, side: int, needle: bool) -> Image.Image:
    coarse = rng.uniform(40, 170, size=(side // 64 + 1, side // 64 + 1, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, size=(side, side, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if needle:
        length, angle = rng.uniform(24, 40), rng.uniform(0, np.pi)
        x, y = rng.uniform(48, side - 48, size=2)
        dx, dy = length / 2 * np.cos(angle), length / 2 * np.sin(angle)
        ImageDraw.Draw(image).line(
            [(x - dx, y - dy), (x + dx, y + dy)], fill=(250, 250, 250), width=3
        )
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * 216 + ["val"] * 24 + ["test"] * 120
    rows = []
    for i, split in enumerate(splits):
        needle = i % 2 == 1
        name = f"photo{i:04d}.png"
        photo(rng, args.side, needle).save(args.out / name)
        rows.append({"path": name, "needle": "yes" if needle else "no", "split": split})
    with (args.out / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "needle", "split"])
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
