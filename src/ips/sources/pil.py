"""Patches of ordinary images (PNG, JPEG, BMP, small TIFF...) decoded whole by Pillow."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .base import PatchSource, cannot_read


def load_image(path: str | os.PathLike, background: int = 255) -> np.ndarray:
    """Decode an image file to uint8 (H, W, C), C = 1 (grey) or 3 (colour).

    EXIF orientation is applied; transparency is composited onto `background`; 16-bit grey
    is reduced to its high byte and float grey is taken as [0, 1].
    """
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode == "1" or (mode == "L" and "transparency" not in img.info):
            return np.asarray(img.convert("L"))[..., None]
        if mode.startswith("I"):
            return np.clip(np.asarray(img).astype(np.int64) >> 8, 0, 255).astype(np.uint8)[
                ..., None
            ]
        if mode == "F":
            return np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None]
        if mode in ("L", "LA", "La"):
            values = np.asarray(img.convert("LA")).astype(np.uint16)
            color, alpha = values[..., :1], values[..., 1:]
        elif "A" in mode or "a" in mode or "transparency" in img.info:
            values = np.asarray(img.convert("RGBA")).astype(np.uint16)
            color, alpha = values[..., :3], values[..., 3:]
        else:
            return np.asarray(img.convert("RGB"))
    return ((color * alpha + (255 - alpha) * background + 127) // 255).astype(np.uint8)


class PillowSource(PatchSource):
    """A patch grid over an image Pillow can decode, decoded whole once.

    Fine for photos and small scans; use `TiffSource` or `OpenSlideSource` for slides.
    Pixels outside the image are `background` (255, white; also used under transparency).
    The decoded pixels travel with the source when it is pickled (from a `DataLoader`
    worker to the training process), which is faster than decoding the file again.

    Args:
        path: the image.
        patch_size: P, in pixels at the read resolution.
        **grid: the patch grid: stride, level, downsample, target_mpp, tissue, min_tissue,
            grid_cache (see `PatchSource._setup`).
        mpp: microns per image pixel, if known.
        name: used in error messages; default the file name.
        background: value of pixels outside the image.
    """

    _transient = ()  # the pixels are data, not a handle: they pickle with the source

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        patch_size: int,
        mpp: float | None = None,
        name: str | None = None,
        background: int = 255,
        **grid: Any,
    ) -> None:
        self._init_file(path, name, background)
        self.mpp = mpp
        self._array: np.ndarray | None = None
        with self._lock:
            self._ensure_open()
        height, width, self.channels = self._array.shape
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self._setup(patch_size=patch_size, **grid)

    def _open(self) -> None:
        from PIL import Image, UnidentifiedImageError

        try:
            self._array = load_image(self.path, self.background)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise cannot_read(self.path, exc) from None

    def _ensure_open(self) -> None:
        if self._array is None:  # decoded once; no handle to reopen after a fork
            self._open()

    def _release(self) -> None:
        self._array = None

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._array[y : y + height, x : x + width]
