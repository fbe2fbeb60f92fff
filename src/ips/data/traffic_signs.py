"""Swedish traffic signs (summer, sets 1 and 2): the speed-limit subset of the IPS paper.

The folder, as the sets unpack::

    traffic_signs/
    ├── Set1/
    │   ├── annotations.txt        one line per image: "<file>:<sign>;<sign>;..."
    │   └── *.jpg                  (or inside Set1Part0/)
    └── Set2/
        ├── annotations.txt
        └── *.jpg

A sign reads ``VISIBILITY, x1, y1, x2, y2, TYPE, NAME`` (a corner pair in pixels, e.g.
``VISIBLE, 1042.09, 471.98, 1010.48, 440.37, SPEED_LIMIT, 70_SIGN``); ``MISC_SIGNS`` marks
signs left unannotated and is ignored, as in the reference code.

Classes: EMPTY (no sign), 50_SIGN, 70_SIGN, 80_SIGN. An image without signs is EMPTY; otherwise
only speed-limit signs count, ranked by visibility (VISIBLE, BLURRED, SIDE_ROAD, OCCLUDED) and
then by larger area; the image is left out when no speed-limit sign remains or the best one is
not VISIBLE, and otherwise takes the best sign's class. One set trains, the other tests (Set1
trains by default). Images are resized to 1200 x 1600 and cut into patches; training adds
colour jitter (0.1 each) and a random translation of up to 100 pixels. Patches stay uint8:
the model normalises them (ImageNet statistics in ``configs/traffic_signs.yaml``).

`download_traffic_signs` fetches the four files over HTTPS and keeps each only when its
SHA-256 matches a known digest.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ips.errors import InputError, MissingFileError
from ips.files import download, sha256_of

log = logging.getLogger(__name__)

CLASSES = ("EMPTY", "50_SIGN", "70_SIGN", "80_SIGN")
SPEED_LIMITS = CLASSES[1:]
VISIBILITY = ("VISIBLE", "BLURRED", "SIDE_ROAD", "OCCLUDED")  # best first
IMAGE_SIZE = (1200, 1600)  # height, width after resizing
MAX_SHIFT = 100  # pixels of random translation at training time (at IMAGE_SIZE)
TASK = "sign"
URL = "https://www.cvl.isy.liu.se/research/trafficSigns/swedishSignsSummer"
FILES = ("Set1/annotations.txt", "Set1/Set1Part0.zip", "Set2/annotations.txt", "Set2/Set2Part0.zip")
# SHA-256 of each file of FILES as the publisher serves it. The publisher lists none; a digest
# goes here once it has been checked against a trusted copy. Until then `download_traffic_signs`
# needs the digests passed in (``sha256=``).
TRAFFIC_SIGNS_SHA256: dict[str, str] = {}


@dataclass(frozen=True)
class Sign:
    """One annotated sign."""

    visibility: str  # VISIBLE, BLURRED, SIDE_ROAD or OCCLUDED
    box: tuple[float, float, float, float]  # two corners (x, y, x, y), pixels
    kind: str  # sign type, e.g. SPEED_LIMIT
    name: str  # e.g. 70_SIGN

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return abs(x2 - x1) * abs(y2 - y1)

    def rank(self) -> tuple[int, float]:
        """Sort key: better visibility first, then larger area."""
        return VISIBILITY.index(self.visibility), -self.area


def _number(text: str, where: str) -> float:
    """A float, ignoring trailing stray characters (``"1042.09l"``) as the reference does."""
    value = text.strip()
    while value:
        try:
            return float(value)
        except ValueError:
            value = value[:-1]
    raise InputError(f"{where}: expected a number, got {text!r}")


def parse_annotations(path: str | os.PathLike) -> list[tuple[str, list[Sign]]]:
    """Image file names and their signs, in file order (``MISC_SIGNS`` left out)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: annotations file not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        line = line.strip()
        if not line:
            continue
        where = f"{path}, line {number + 1}"
        if ":" not in line:
            raise InputError(f"{where}: expected '<image>:<signs>', got {line[:80]!r}")
        image, rest = line.split(":", 1)
        signs = []
        for entry in rest.split(";"):
            parts = [p.strip() for p in entry.split(",")]
            if not parts[0] or parts[0] == "MISC_SIGNS":
                continue
            if len(parts) < 7:
                raise InputError(
                    f"{where}: a sign needs visibility, 4 coordinates, type and name, "
                    f"got {entry.strip()!r}"
                )
            if parts[0] not in VISIBILITY:
                raise InputError(
                    f"{where}: visibility must be one of {VISIBILITY}, got {parts[0]!r}"
                )
            box = tuple(_number(p, where) for p in parts[1:5])
            signs.append(Sign(parts[0], box, parts[5], parts[6]))  # type: ignore[arg-type]
        out.append((image.strip(), signs))
    return out


def label_of(signs: Sequence[Sign]) -> int | None:
    """The class of an image (index into CLASSES), or None when it is left out."""
    if not signs:
        return 0
    limits = sorted((s for s in signs if s.name in SPEED_LIMITS), key=Sign.rank)
    if not limits or limits[0].visibility != "VISIBLE":
        return None
    return CLASSES.index(limits[0].name)


def speed_limit_images(root: str | os.PathLike, set_number: int) -> list[tuple[Path, int]]:
    """The kept images of one set and their classes, in annotation order."""
    folder = Path(root) / f"Set{set_number}"
    annotations = folder / "annotations.txt"
    if not annotations.is_file():
        raise MissingFileError(
            f"{annotations}: missing; fetch the sets with data.options.download: true or "
            "unpack them there (see ips.data.traffic_signs)"
        )
    kept, missing = [], []
    for name, signs in parse_annotations(annotations):
        label = label_of(signs)
        if label is None:
            continue
        candidates = [folder / name, folder / f"Set{set_number}Part0" / name]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(name)
        else:
            kept.append((found, label))
    if missing:
        raise MissingFileError(
            f"{folder}: {len(missing)} annotated image(s) are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    return kept


class TrafficSigns(Dataset):
    """Speed-limit images of one set, resized and cut into a grid of patches.

    ``dataset[i]`` is ``{"patches": (N, 3, P, P) uint8, "targets": {"sign": () long},
    "index": i}`` with N = (H // P) * (W // P) in raster order (192 for the paper's 1200 x 1600
    images and P = 100).

    Args:
        root: the folder holding Set1/ and Set2/.
        split: "train" (set `train_set`) or "test" (the other set).
        patch_size: P.
        indices: positions to keep (e.g. a validation part of the training set).
        train_set: 1 or 2, the set used for training.
        image_size: (H, W) after resizing.
        augment: colour jitter and random translation; default on for "train".
        download: fetch the sets first when annotations are missing.
        sha256: digests for the download, as in `download_traffic_signs`.
    """

    grid_shape: tuple[int, int]

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        patch_size: int = 100,
        indices: Sequence[int] | None = None,
        train_set: int = 1,
        image_size: Sequence[int] = IMAGE_SIZE,
        augment: bool | None = None,
        download: bool = False,
        sha256: Mapping[str, str] | str | os.PathLike | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        if train_set not in (1, 2):
            raise InputError(f"data.options.train_set must be 1 or 2, got {train_set!r}")
        self.root = Path(root)
        if download:
            download_traffic_signs(self.root, sha256=sha256)
        height, width = (int(v) for v in image_size)
        if height < patch_size or width < patch_size:
            raise InputError(f"image_size {height}x{width} is smaller than patch_size {patch_size}")
        self.image_size = (height, width)
        self.patch_size = int(patch_size)
        self.grid_shape = (height // patch_size, width // patch_size)
        self.set_number = train_set if split == "train" else 3 - train_set
        items = speed_limit_images(self.root, self.set_number)
        if indices is not None:
            items = [items[i] for i in indices]
        if not items:
            raise InputError(f"{self.root / f'Set{self.set_number}'}: no image is kept")
        self.items = items
        self.split = split
        self.augment = split == "train" if augment is None else augment
        self._transform: Any = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def transform(self) -> Any:
        """Resize, then (when augmenting) colour jitter and random translation."""
        if self._transform is None:
            from torchvision.transforms import v2

            height, width = self.image_size
            steps: list[Any] = [v2.Resize((height, width), antialias=True)]
            if self.augment:
                # 100 pixels at 1200 x 1600, the same share of the image at other sizes
                shift = (MAX_SHIFT / IMAGE_SIZE[1], MAX_SHIFT / IMAGE_SIZE[0])
                steps += [v2.ColorJitter(0.1, 0.1, 0.1, 0.1), v2.RandomAffine(0, translate=shift)]
            self._transform = v2.Compose(steps)
        return self._transform

    def image(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3, H, W), resized (and augmented when training)."""
        from PIL import Image

        path = self.items[i][0]
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (3, h, w)
        return self.transform()(tensor)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.image(i)  # (3, H, W)
        p, (rows, cols) = self.patch_size, self.grid_shape
        grid = image[:, : rows * p, : cols * p].reshape(3, rows, p, cols, p)
        patches = grid.permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, p, p)  # raster order
        return {"patches": patches.contiguous(), "targets": self.targets(i), "index": i}

    def targets(self, i: int) -> dict[str, torch.Tensor]:
        """The label of image i, without reading it: () long."""
        return {TASK: torch.tensor(self.items[i][1], dtype=torch.long)}


def _digests(sha256: Mapping[str, str] | str | os.PathLike | None) -> dict[str, str]:
    """Digests by file name (FILES), from a mapping or a ``sha256sum`` listing."""
    if sha256 is None:
        return dict(TRAFFIC_SIGNS_SHA256)
    if isinstance(sha256, Mapping):
        return {str(k): str(v).lower() for k, v in sha256.items()}
    listing = Path(sha256)
    if not listing.is_file():
        raise MissingFileError(f"{listing}: no such checksum file")
    out = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            digest, _, name = line.strip().partition(" ")
            out[name.strip().lstrip("*")] = digest.lower()
    return out


def download_traffic_signs(
    root: str | os.PathLike, *, sha256: Mapping[str, str] | str | os.PathLike | None = None
) -> Path:
    """Fetch Set1 and Set2 (summer) into `root` and unpack the images.

    Each file of FILES comes over HTTPS (certificates checked) and is kept only when its
    SHA-256 matches; a file already there with the right digest is not fetched again.

    Args:
        root: the dataset folder.
        sha256: the expected digests by file name (e.g. ``"Set1/Set1Part0.zip"``): a mapping,
            or a file in ``sha256sum`` format; default `TRAFFIC_SIGNS_SHA256`.

    Returns:
        `root`.
    """
    root = Path(root)
    digests = _digests(sha256)
    unknown = [name for name in FILES if name not in digests]
    if unknown:
        raise InputError(
            f"no SHA-256 known for {', '.join(unknown)}: pass the digests you trust "
            "(data.options.sha256: a mapping or a sha256sum file) so the download can be checked"
        )
    for name in FILES:
        target = root / name
        if target.is_file() and sha256_of(target) == digests[name]:
            continue
        log.info("downloading %s/%s", URL, name)
        download(f"{URL}/{name}", target, digests[name])
    for name in FILES:
        if name.endswith(".zip"):
            _unpack(root / name, (root / name).parent)
    return root


def _unpack(archive: Path, folder: Path) -> None:
    """Extract the images of a zip archive into `folder` (members must stay inside it)."""
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            target = (folder / member.filename).resolve()
            if not target.is_relative_to(folder.resolve()):
                raise InputError(f"{archive}: member {member.filename!r} would land outside")
            if not member.is_dir() and not target.exists():
                zf.extract(member, folder)
