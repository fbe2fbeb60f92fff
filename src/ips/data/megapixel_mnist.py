"""Megapixel MNIST: five MNIST digits and line-stroke noise on a large black canvas.

Per image: a target class t uniform in 0..9; three digits of class t and two digits of classes
drawn uniformly from the other nine (they may coincide), so t is always the strict majority.
Noise patterns (28 x 28 templates of two straight strokes, intensity 0.8-1.0, 50 templates per
dataset) are painted first at random positions with a pixel-wise maximum; then the 28 x 28 boxes
of the five digits, which never overlap, replace what was under them. Everything lies fully
inside the canvas. Train images use MNIST train-split digits only, test images test-split ones.

Tasks (all 10 classes):

- majority: the target class t;
- max: the largest of the five digit labels;
- top: the label of the digit whose box is nearest the top edge (smallest row, then column);
- multi: multi-hot vector of the classes present (multilabel).

`generate_megapixel_mnist` stores only the description of each image (which digit goes where,
which noise template goes where) in one compressed ``.npz``; `MegapixelMNIST` renders images
from it on the fly. File layout, ``{split}`` being ``train`` or ``test``::

    megapixel_mnist.npz
    ├── format_version ()            1
    ├── canvas_size (2,)             H, W
    ├── num_noise, seed ()           generation parameters
    ├── source ()                    str: where the digits came from
    ├── noise_templates (50, 28, 28) uint8, strokes 204..255 on 0
    ├── {split}_digit_bitmaps (K, 28, 28)  uint8: the distinct MNIST digits used
    ├── {split}_digit_mnist_index (K,)     row of each bitmap in that MNIST split
    ├── {split}_digit_ids (n, 5)           bitmap of each digit of each image
    ├── {split}_digit_labels (n, 5)        class of each digit (first three: the target)
    ├── {split}_digit_positions (n, 5, 2)  row, col of each digit box's top-left pixel
    ├── {split}_noise_ids (n, num_noise)   template of each noise pattern
    ├── {split}_noise_positions (n, num_noise, 2)  row, col of each noise pattern
    └── {split}_target_{task} (n,) or (n, 10)      labels per task (multi: 0/1)
"""

from __future__ import annotations

import operator
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ips.errors import InputError, MissingFileError
from ips.files import atomic_write

from .mnist import MnistDigits

TASKS: dict[str, tuple[str, int]] = {
    "majority": ("multiclass", 10),
    "max": ("multiclass", 10),
    "top": ("multiclass", 10),
    "multi": ("multilabel", 10),
}
FORMAT_VERSION = 1
SPLITS = ("train", "test")
NUM_CLASSES = 10
DIGIT_SIZE = 28  # side of a digit box and of a noise template
DIGITS_PER_IMAGE = 5
TARGET_DIGITS = 3  # digits of the target class per image; the other two are of other classes
NUM_TEMPLATES = 50  # noise templates per dataset
STROKES_PER_TEMPLATE = 2
_PLACEMENT_ROUNDS = 100  # rejection-sampling rounds before placing the few left exactly


def generate_megapixel_mnist(
    out: str | os.PathLike,
    digits: MnistDigits,
    *,
    num_train: int = 5000,
    num_test: int = 1000,
    canvas_size: tuple[int, int] = (1500, 1500),
    num_noise: int = 50,
    seed: int = 0,
) -> Path:
    """Describe a Megapixel MNIST dataset and save it as one compressed ``.npz``.

    Only digit bitmaps, ids, positions and labels are stored (the layout is in the module
    docstring), never whole images: 5000 + 1000 images take a few MB. The same digits, arguments
    and seed give identical arrays.

    Args:
        out: the ``.npz`` file to write (atomically); parent folders are created.
        digits: MNIST splits, e.g. from `load_mnist`.
        num_train: number of training images.
        num_test: number of test images.
        canvas_size: H, W of every image.
        num_noise: noise patterns painted per image (0 for none).
        seed: seed of all random choices.

    Returns:
        The path written.
    """
    out = Path(out)
    if out.is_dir():
        raise InputError(f"out must be a file path, got the folder {out}")
    _check_count("num_train", num_train, minimum=1)
    _check_count("num_test", num_test, minimum=1)
    _check_count("num_noise", num_noise, minimum=0)
    _check_count("seed", seed, minimum=0)
    height, width = _check_canvas_size(canvas_size)
    for split in SPLITS:
        missing = sorted(set(range(NUM_CLASSES)) - set(getattr(digits, f"{split}_labels").tolist()))
        if missing:
            raise InputError(f"digits: the {split} split has no digits of classes {missing}")

    template_seed, train_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    arrays: dict[str, np.ndarray] = {
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "canvas_size": np.array([height, width], dtype=np.int64),
        "num_noise": np.array(num_noise, dtype=np.int64),
        "seed": np.array(seed, dtype=np.int64),
        "source": np.array(str(digits.source)),
        "noise_templates": make_noise_templates(np.random.default_rng(template_seed)),
    }
    for split, count, split_seed in (
        ("train", num_train, train_seed),
        ("test", num_test, test_seed),
    ):
        described = _describe_split(
            np.random.default_rng(split_seed),
            images=getattr(digits, f"{split}_images"),
            labels=getattr(digits, f"{split}_labels"),
            count=count,
            canvas_size=(height, width),
            num_noise=num_noise,
        )
        arrays.update({f"{split}_{key}": value for key, value in described.items()})
    _save_atomic(out, arrays)
    return out


def make_noise_templates(
    rng: np.random.Generator, count: int = NUM_TEMPLATES, size: int = DIGIT_SIZE
) -> np.ndarray:
    """Draw noise templates of two straight strokes each, 1-2 px wide, intensity 0.8-1.0.

    Returns:
        (count, size, size) uint8: strokes 204..255 on 0.
    """
    templates = np.zeros((count, size, size), dtype=np.uint8)
    for template in templates:
        for _ in range(STROKES_PER_TEMPLATE):
            intensity = int(round(255 * rng.uniform(0.8, 1.0)))
            width = int(rng.integers(1, 3))
            while True:  # strokes at least a third of the template long
                start, end = rng.uniform(0, size - 1, size=(2, 2))
                if np.hypot(*(end - start)) >= size / 3:
                    break
            _draw_stroke(template, start, end, intensity, width)
    return templates


def _draw_stroke(
    canvas: np.ndarray, start: np.ndarray, end: np.ndarray, intensity: int, width: int
) -> None:
    """Paint a straight stroke from start to end (row, col), `width` px thick, in place."""
    steps = int(np.ceil(2 * np.hypot(*(end - start)))) + 1
    points = np.rint(start + np.linspace(0, 1, steps)[:, None] * (end - start)).astype(np.int64)
    if width == 2:  # thicken across the stroke: below a flat one, right of a steep one
        across = (1, 0) if abs(end[1] - start[1]) >= abs(end[0] - start[0]) else (0, 1)
        points = np.concatenate([points, points + np.array(across)])
    points = np.clip(points, 0, np.array(canvas.shape) - 1)
    rows, cols = points[:, 0], points[:, 1]
    canvas[rows, cols] = np.maximum(canvas[rows, cols], intensity)


def _describe_split(
    rng: np.random.Generator,
    *,
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    canvas_size: tuple[int, int],
    num_noise: int,
) -> dict[str, np.ndarray]:
    """Draw classes, MNIST digits, positions and noise of `count` images from one split."""
    height, width = canvas_size
    # classes: three of the target, two drawn from the nine others
    targets = rng.integers(0, NUM_CLASSES, size=count)  # (n,)
    others = (targets[:, None] + rng.integers(1, NUM_CLASSES, size=(count, 2))) % NUM_CLASSES
    digit_labels = np.concatenate([np.repeat(targets[:, None], TARGET_DIGITS, 1), others], 1)

    # one MNIST digit of the right class per slot: a uniform pick within that class
    by_class = np.argsort(labels, kind="stable")  # split rows grouped by class
    class_sizes = np.bincount(labels, minlength=NUM_CLASSES)
    class_starts = np.concatenate([[0], np.cumsum(class_sizes)[:-1]])
    picks = class_starts[digit_labels] + rng.integers(0, class_sizes[digit_labels])  # (n, 5)
    mnist_index = by_class[picks]  # (n, 5)
    used, digit_ids = np.unique(mnist_index, return_inverse=True)

    positions = _place_digits(rng, count, canvas_size)  # (n, 5, 2)
    noise_ids = rng.integers(0, NUM_TEMPLATES, size=(count, num_noise))
    noise_positions = np.stack(
        [
            rng.integers(0, height - DIGIT_SIZE + 1, size=(count, num_noise)),
            rng.integers(0, width - DIGIT_SIZE + 1, size=(count, num_noise)),
        ],
        axis=-1,
    )  # (n, num_noise, 2)

    rows = np.arange(count)
    nearest_top = np.argmin(positions[..., 0] * width + positions[..., 1], axis=1)  # row, then col
    multi = np.zeros((count, NUM_CLASSES), dtype=np.uint8)
    multi[rows[:, None], digit_labels] = 1
    position_dtype = np.uint16 if max(canvas_size) <= np.iinfo(np.uint16).max else np.int64
    return {
        "digit_bitmaps": images[used],
        "digit_mnist_index": used.astype(np.int64),
        "digit_ids": digit_ids.reshape(count, DIGITS_PER_IMAGE).astype(np.int32),
        "digit_labels": digit_labels.astype(np.uint8),
        "digit_positions": positions.astype(position_dtype),
        "noise_ids": noise_ids.astype(np.uint8),
        "noise_positions": noise_positions.astype(position_dtype),
        "target_majority": targets.astype(np.uint8),
        "target_max": digit_labels.max(axis=1).astype(np.uint8),
        "target_top": digit_labels[rows, nearest_top].astype(np.uint8),
        "target_multi": multi,
    }


def _place_digits(rng: np.random.Generator, count: int, canvas_size: tuple[int, int]) -> np.ndarray:
    """Uniform positions of five non-overlapping digit boxes per image.

    Returns:
        (count, 5, 2) int64: row, col of each box's top-left pixel.
    """
    free_rows, free_cols = (side - DIGIT_SIZE + 1 for side in canvas_size)
    positions = np.zeros((count, DIGITS_PER_IMAGE, 2), dtype=np.int64)
    for slot in range(DIGITS_PER_IMAGE):
        # rejection sampling, vectorised over the images whose digit still overlaps another
        pending = np.arange(count)
        for _ in range(_PLACEMENT_ROUNDS):
            candidates = np.stack(
                [
                    rng.integers(0, free_rows, len(pending)),
                    rng.integers(0, free_cols, len(pending)),
                ],
                axis=-1,
            )  # (pending, 2)
            positions[pending, slot] = candidates
            gaps = np.abs(positions[pending, :slot] - candidates[:, None])  # (pending, slot, 2)
            overlaps = (gaps < DIGIT_SIZE).all(axis=-1).any(axis=-1)
            pending = pending[overlaps]
            if len(pending) == 0:
                break
        for image in pending:  # crowded canvases only: draw among the free positions exactly
            free = np.ones((free_rows, free_cols), dtype=bool)
            for row, col in positions[image, :slot].tolist():
                top, left = max(row - DIGIT_SIZE + 1, 0), max(col - DIGIT_SIZE + 1, 0)
                free[top : row + DIGIT_SIZE, left : col + DIGIT_SIZE] = False
            choice = rng.choice(np.flatnonzero(free))
            positions[image, slot] = divmod(int(choice), free_cols)
    return positions


def _check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_canvas_size(canvas_size: tuple[int, int]) -> tuple[int, int]:
    """Ensure every digit finds room: placed boxes block at most 4 * 55 * 55 top-left positions."""
    try:
        height, width = (operator.index(side) for side in canvas_size)
    except (TypeError, ValueError):
        raise InputError(f"canvas_size must be two integers (H, W), got {canvas_size!r}") from None
    blocked = (DIGITS_PER_IMAGE - 1) * (2 * DIGIT_SIZE - 1) ** 2
    if (
        min(height, width) < DIGIT_SIZE
        or (height - DIGIT_SIZE + 1) * (width - DIGIT_SIZE + 1) <= blocked
    ):
        raise InputError(
            f"canvas_size must fit 5 non-overlapping 28 x 28 digits wherever they fall: "
            f"H, W >= 28 and (H - 27) * (W - 27) > {blocked} (e.g. 138 x 138), "
            f"got {canvas_size!r}"
        )
    return height, width


def _save_atomic(out: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(out) as stream:
        np.savez_compressed(stream, **arrays)


class MegapixelMNIST(Dataset):
    """Megapixel MNIST images from a file of `generate_megapixel_mnist`, cut into patches.

    Each image is rendered on the fly and cut into P x P windows every `stride` pixels, in
    raster order (row-major)::

        image (H, W) uint8                   patches (N, 1, P, P) uint8, N = rows * cols
        ┌────┬────┬────┬──┐                  ┌───┬───┬───┬───┬───┬───┐
        │ 0  │ 1  │ 2  │  │ <- right and     │ 0 │ 1 │ 2 │ 3 │ 4 │ 5 │ ...
        ├────┼────┼────┤  │    bottom border └───┴───┴───┴───┴───┴───┘
        │ 3  │ 4  │ 5  │  │    narrower than
        ├────┴────┴────┘  │    P is dropped
        └─────────────────┘

    ``dataset[i]`` is a dict::

        {"patches": (N, 1, P, P) uint8 tensor, 0..255,
         "targets": {"majority": () long, "max": () long, "top": () long,
                     "multi": (10,) float32 multi-hot},
         "index": i}

    With the defaults (1500 x 1500 canvas, P = 50) N = 30 * 30 = 900. All methods take the
    position i in this dataset (after `indices`); `image_ids[i]` is the image's row in the file.

    Args:
        path: ``.npz`` written by `generate_megapixel_mnist`.
        split: "train" or "test".
        patch_size: P, side of the square patches in pixels.
        stride: pixels between neighbouring patches; defaults to P (non-overlapping).
        indices: rows of the split to use (e.g. to carve a validation set); default all.
    """

    tasks = TASKS
    channels = 1  # C: grey images

    def __init__(
        self,
        path: str | os.PathLike,
        split: str = "train",
        *,
        patch_size: int = 50,
        stride: int | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.path = Path(path)
        if split not in SPLITS:
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        if not self.path.is_file():
            raise MissingFileError(
                f"Megapixel MNIST file {self.path} not found; write it with "
                "generate_megapixel_mnist"
            )
        self.split = split
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                version = int(npz["format_version"])
                if version != FORMAT_VERSION:
                    raise InputError(
                        f"Megapixel MNIST file {self.path}: expected format version "
                        f"{FORMAT_VERSION}, got {version}"
                    )
                height, width = (int(side) for side in npz["canvas_size"])
                self.source = str(npz["source"])
                self._noise_templates = npz["noise_templates"]
                self._digit_bitmaps = npz[f"{split}_digit_bitmaps"]
                self._digit_ids = npz[f"{split}_digit_ids"].astype(np.int64)
                self._digit_positions = npz[f"{split}_digit_positions"].astype(np.int64)
                self._noise_ids = npz[f"{split}_noise_ids"].astype(np.int64)
                self._noise_positions = npz[f"{split}_noise_positions"].astype(np.int64)
                self._targets = {task: npz[f"{split}_target_{task}"] for task in TASKS}
        except KeyError as error:
            raise InputError(
                f"Megapixel MNIST file {self.path} lacks array {error}; "
                "expected a file written by generate_megapixel_mnist"
            ) from None
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            if str(self.path) in str(error):
                raise
            reason = " ".join(str(error).split()) or type(error).__name__
            if not zipfile.is_zipfile(self.path):  # numpy would guess "a pickle"
                reason = "not a zip archive"
            raise InputError(
                f"Megapixel MNIST file {self.path}: cannot read it as an .npz of plain arrays "
                f"({reason[:200]}); expected a file written by generate_megapixel_mnist"
            ) from None

        self.canvas_size: tuple[int, int] = (height, width)
        self._check_contents()
        stride = patch_size if stride is None else stride
        if not 1 <= patch_size <= min(height, width):
            raise InputError(
                f"patch_size must lie in 1..{min(height, width)} (the images of {self.path} "
                f"are {height} x {width}), got {patch_size}"
            )
        if stride < 1:
            raise InputError(f"stride must be >= 1, got {stride}")
        self.patch_size = patch_size
        self.stride = stride
        self.grid_shape: tuple[int, int] = (
            (height - patch_size) // stride + 1,
            (width - patch_size) // stride + 1,
        )
        self.num_patches = self.grid_shape[0] * self.grid_shape[1]

        num_images = len(self._digit_ids)
        if indices is None:
            self.image_ids = np.arange(num_images)
        else:
            self.image_ids = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(self.image_ids) and not (
                0 <= self.image_ids.min() and self.image_ids.max() < num_images
            ):
                raise InputError(
                    f"indices must lie in 0..{num_images - 1} for the {split} split of "
                    f"{self.path}, got {self.image_ids.min()}..{self.image_ids.max()}"
                )

    def _check_contents(self) -> None:
        """Fail early, naming the array, when the file describes images that cannot be drawn
        or labels outside the tasks' classes (a damaged or hand-made file)."""
        height, width = self.canvas_size
        count = len(self._digit_ids)
        checks = [
            ("digit_ids", self._digit_ids, 0, len(self._digit_bitmaps) - 1, (count, 5)),
            ("noise_ids", self._noise_ids, 0, len(self._noise_templates) - 1, None),
            ("digit_positions", self._digit_positions[..., 0], 0, height - DIGIT_SIZE, None),
            ("digit_positions", self._digit_positions[..., 1], 0, width - DIGIT_SIZE, None),
            ("noise_positions", self._noise_positions[..., 0], 0, height - DIGIT_SIZE, None),
            ("noise_positions", self._noise_positions[..., 1], 0, width - DIGIT_SIZE, None),
        ]
        for task, (kind, classes) in TASKS.items():
            shape = (count, classes) if kind == "multilabel" else (count,)
            high = 1 if kind == "multilabel" else classes - 1
            checks.append((f"target_{task}", self._targets[task], 0, high, shape))
        for name, values, low, high, shape in checks:
            where = f"Megapixel MNIST file {self.path}: {self.split}_{name}"
            if shape is not None and values.shape != shape:
                raise InputError(f"{where} must have shape {shape}, found {values.shape}")
            if values.size and (values.min() < low or values.max() > high):
                bad = values[(values < low) | (values > high)].reshape(-1)[0]
                raise InputError(f"{where} must lie in {low}..{high}, found {bad}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        height, width = self.canvas_size
        rows, cols = self.grid_shape
        return (
            f"MegapixelMNIST({str(self.path)!r}, split={self.split!r}, images={len(self)}, "
            f"canvas={height}x{width}, patches={rows}x{cols} of {self.patch_size} px)"
        )

    def __getitem__(self, i: int) -> dict:
        i = self._position(i)
        patches = self._windows(self.render(i))  # (N, P, P)
        return {
            "patches": torch.from_numpy(patches).unsqueeze(1),  # (N, 1, P, P)
            "targets": self.targets(i),
            "index": i,
        }

    def render(self, i: int) -> np.ndarray:
        """Draw image i: noise first (pixel-wise max), then the digit boxes over it.

        Returns:
            (H, W) uint8, 0..255.
        """
        image = self.image_ids[self._position(i)]
        canvas = np.zeros(self.canvas_size, dtype=np.uint8)
        noise = zip(
            self._noise_ids[image].tolist(), self._noise_positions[image].tolist(), strict=True
        )
        for template, (row, col) in noise:
            window = canvas[row : row + DIGIT_SIZE, col : col + DIGIT_SIZE]
            np.maximum(window, self._noise_templates[template], out=window)
        digits = zip(
            self._digit_ids[image].tolist(), self._digit_positions[image].tolist(), strict=True
        )
        for digit, (row, col) in digits:
            canvas[row : row + DIGIT_SIZE, col : col + DIGIT_SIZE] = self._digit_bitmaps[digit]
        return canvas

    def targets(self, i: int) -> dict[str, torch.Tensor]:
        """Labels of image i without rendering it: () long per multiclass task, (10,) float32
        for the multilabel one."""
        image = self.image_ids[self._position(i)]
        return {
            task: torch.tensor(self._targets[task][image].astype(np.float32))
            if kind == "multilabel"
            else torch.tensor(int(self._targets[task][image]), dtype=torch.long)
            for task, (kind, _) in TASKS.items()
        }

    def foreground_patches(self, i: int) -> np.ndarray:
        """Which patches of image i overlap a non-zero pixel of a digit (noise does not count).

        Returns:
            (N,) bool, raster order.
        """
        image = self.image_ids[self._position(i)]
        mask = np.zeros(self.canvas_size, dtype=bool)
        for digit, (row, col) in zip(
            self._digit_ids[image].tolist(), self._digit_positions[image].tolist(), strict=True
        ):
            mask[row : row + DIGIT_SIZE, col : col + DIGIT_SIZE] = self._digit_bitmaps[digit] > 0
        return self._windows(mask).reshape(self.num_patches, -1).any(axis=1)

    def digit_boxes(self, i: int) -> np.ndarray:
        """Boxes of the five digits of image i.

        Returns:
            (5, 4) int64: row, col, height (28), width (28).
        """
        image = self.image_ids[self._position(i)]
        sizes = np.full((DIGITS_PER_IMAGE, 2), DIGIT_SIZE, dtype=np.int64)
        return np.concatenate([self._digit_positions[image], sizes], axis=1)

    def _position(self, i: int) -> int:
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index must lie in 0..{len(self) - 1}, got {i}")
        return i

    def _windows(self, image: np.ndarray) -> np.ndarray:
        """Cut (H, W) into (N, P, P) windows in raster order, dropping a border narrower than P."""
        size, stride = self.patch_size, self.stride
        rows, cols = self.grid_shape
        if stride == size:  # a pure reshape: (rows, P, cols, P) -> (rows, cols, P, P)
            grid = image[: rows * size, : cols * size].reshape(rows, size, cols, size)
            return np.ascontiguousarray(grid.swapaxes(1, 2)).reshape(-1, size, size)
        view = np.lib.stride_tricks.sliding_window_view(image, (size, size))[::stride, ::stride]
        return np.ascontiguousarray(view).reshape(-1, size, size)  # (rows * cols, P, P)
