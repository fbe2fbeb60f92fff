"""Patches of whole-slide images read with OpenSlide (SVS, NDPI, MRXS, SCN, DICOM, TIFF...)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .base import CannotReadError, PatchSource, cannot_read, require

SHARED_CACHE_MB = 64  # decoded tiles held for all OpenSlideSources of a process together
_SHARED: dict[int, Any] = {}  # process id -> the OpenSlideCache of that process


def shared_cache(openslide: Any) -> Any:
    """This process's OpenSlide tile cache for every slide without a cache of its own (by
    default OpenSlide gives each open slide its own 32 MiB): memory stays the same however
    many slides are open. None where the library cannot share caches (OpenSlide < 4)."""
    pid = os.getpid()
    if pid not in _SHARED:
        _SHARED.clear()  # a forked child: the parent's cache is not its own
        try:
            _SHARED[pid] = openslide.OpenSlideCache(SHARED_CACHE_MB * 2**20)
        except Exception:  # OpenSlideVersionError and the like
            _SHARED[pid] = None
    return _SHARED[pid]


def composite(rgba: np.ndarray, background: int) -> np.ndarray:
    """Straight-alpha RGBA (h, w, 4) -> RGB (h, w, 3) over a grey `background`."""
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    alpha = alpha.astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16) * alpha + (255 - alpha) * background
    return ((rgb + 127) // 255).astype(np.uint8)


class OpenSlideSource(PatchSource):
    """A patch grid over a slide opened with OpenSlide.

    OpenSlide returns RGBA; transparent pixels (outside the scanned area, or outside the image)
    are composited onto `background` (255, white, the pathology convention). The grid covers
    the whole level, including any empty margin; use `tissue` to skip it.

    Args:
        path: the slide.
        patch_size: P, in pixels at the read resolution.
        **grid: the patch grid: stride, level, downsample, target_mpp, tissue, min_tissue,
            grid_cache (see `PatchSource._setup`).
        mpp: microns per level-0 pixel, overriding the slide's `openslide.mpp-x`.
        name: used in error messages; default the file name.
        background: grey value transparent pixels are composited onto.
        cache_mb: size of a tile cache of its own (per process); default None: the
            process's shared cache (`SHARED_CACHE_MB` for all slides together).
    """

    _transient = ("_slide",)

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        patch_size: int,
        mpp: float | None = None,
        name: str | None = None,
        background: int = 255,
        cache_mb: float | None = None,
        **grid: Any,
    ) -> None:
        require("openslide")
        self._init_file(path, name, background)
        self._cache_mb = cache_mb
        self._slide: Any = None
        with self._lock:
            try:
                self._open()
                self._opened_pid = os.getpid()
            except Exception as exc:
                raise cannot_read(self.path, exc) from None
            slide = self._slide
            self.level_dimensions = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
            file_mpp = slide.properties.get("openslide.mpp-x")
        self.channels = 3
        self.mpp = mpp if mpp is not None else (float(file_mpp) if file_mpp else None)
        try:
            self._setup(patch_size=patch_size, **grid)
        finally:
            self.close()

    def _open(self) -> None:
        openslide = require("openslide")
        slide = openslide.OpenSlide(str(self.path))
        if self._cache_mb is not None:
            slide.set_cache(openslide.OpenSlideCache(int(self._cache_mb * 2**20)))
        elif (cache := shared_cache(openslide)) is not None:
            slide.set_cache(cache)
        self._slide = slide

    def _release(self) -> None:
        if self._slide is not None:
            self._slide.close()
        self._slide = None

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        scale = self.level_downsamples[level]
        location = (round(x * scale), round(y * scale))  # OpenSlide takes level-0 coordinates
        try:
            rgba = np.asarray(self._slide.read_region(location, level, (width, height)))
        except Exception as exc:  # OpenSlideError: a corrupt tile; the handle stays failed
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise CannotReadError(
                f"{self.path}: cannot read the region at level-0 {location}, "
                f"{width} x {height} pixels of level {level} ({reason})"
            ) from None
        return composite(rgba, self.background)
