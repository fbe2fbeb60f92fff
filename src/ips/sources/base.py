"""The patch-source protocol: lazy access to the patches of one large image.

A source cuts an image into a grid of square patches and reads any subset of them on demand,
so an image far larger than memory can be fed to Iterative Patch Selection patch by patch.

Grid convention: patches of side P are placed at stride S (default P) in raster (row-major)
order over the image at the read resolution; border patches that would stick out are dropped.
With a tissue filter only the listed patches are kept (still in raster order).

Coordinates: `coords[i]` is the level-0 (x, y) pixel of patch i's top-left corner, whatever
level it is read from; `positions(ids)` gives its (row, col) in the full grid.

Handles: files are opened on first read and re-opened after pickling or in a forked process,
so one source object works in every `DataLoader` worker.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import importlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ips.config import GridConfig
from ips.errors import InputError, MissingExtraError, MissingFileError

from .grid_cache import GridCache, file_identity
from .tissue import (
    MIN_SATURATION,
    EmptyTissueError,
    load_tissue_mask,
    otsu_threshold_mask,
    tissue_patch_ids,
)

logger = logging.getLogger(__name__)

WSI_EXTRA_HINT = "reading slides needs: pip install 'iterative-patch-selection[wsi]'"
TISSUE_THUMBNAIL_SIZE = 2048  # longest side of the thumbnail the Otsu tissue mask is computed on
_BAND_BYTES = 32 * 2**20  # bytes of a level decoded at once while building a thumbnail

TissueSpec = str | os.PathLike | np.ndarray | None


class CannotReadError(InputError):
    """A file exists but cannot be read as a slide or image (corrupt or unsupported)."""


def require(module: str) -> Any:
    """Import an optional dependency of the `wsi` extra, or raise an ImportError naming it."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: openslide-python without its C library
        raise MissingExtraError(WSI_EXTRA_HINT) from exc


def check_path(path: str | os.PathLike) -> Path:
    """Return `path` as a Path, or raise FileNotFoundError naming it."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    return path


def cannot_read(path: str | os.PathLike, reason: BaseException | str) -> CannotReadError:
    """The one-line error for a file that exists but is not a readable slide or image."""
    text = " ".join(str(reason).split()) or type(reason).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    return CannotReadError(f"{path}: cannot read as a slide or image ({text})")


class Resolution(NamedTuple):
    """Where patches are read from."""

    level: int  # pyramid level the pixels come from
    downsample: float  # level-0 pixels per output pixel
    resample: bool  # True when regions of `level` are resized on read to reach `downsample`


def choose_resolution(
    level_downsamples: Sequence[float],
    *,
    level: int | None = None,
    downsample: float | None = None,
    target_mpp: float | None = None,
    mpp: float | None = None,
    name: str = "image",
    rtol: float = 0.01,
) -> Resolution:
    """Pick the pyramid level (and whether to resize) for a requested resolution.

    At most one of `level`, `downsample` and `target_mpp` may be given; none means level 0.
    A `downsample` (or `target_mpp / mpp`) within `rtol` of a level's downsample reads that level
    as it is. Otherwise the coarsest level finer than the request is read and resized on the fly
    (area averaging), so patches always have the requested resolution.

    Args:
        level_downsamples: level-0 pixels per pixel of every pyramid level.
        level: pyramid level to read.
        downsample: level-0 pixels per output pixel.
        target_mpp: microns per output pixel; needs `mpp`.
        mpp: microns per level-0 pixel, if known.
        name: used in error messages.
        rtol: relative tolerance for matching an existing level.

    Returns:
        Resolution(level, downsample, resample).
    """
    options = {"level": level, "downsample": downsample, "target_mpp": target_mpp}
    given = [key for key, value in options.items() if value is not None]
    if len(given) > 1:
        raise InputError(
            f"{name}: give at most one of level, downsample, target_mpp; got {' and '.join(given)}"
        )
    downsamples = [float(d) for d in level_downsamples]
    if level is not None:
        if not 0 <= level < len(downsamples):
            raise InputError(f"{name}: level must be in [0, {len(downsamples)}), got {level}")
        return Resolution(int(level), downsamples[level], False)
    if target_mpp is not None:
        if mpp is None:
            raise InputError(
                f"{name}: target_mpp={target_mpp} needs the microns per pixel of level 0, "
                "which the file does not record; pass mpp="
            )
        if target_mpp <= 0 or mpp <= 0:
            raise InputError(f"{name}: target_mpp and mpp must be > 0, got {target_mpp} and {mpp}")
        downsample = target_mpp / mpp
    if downsample is None:
        return Resolution(0, downsamples[0], False)
    if downsample <= 0:
        raise InputError(f"{name}: downsample must be > 0, got {downsample}")
    finer = [k for k, d in enumerate(downsamples) if d <= downsample * (1 + rtol)]
    chosen = max(finer, key=lambda k: downsamples[k]) if finer else int(np.argmin(downsamples))
    if abs(downsamples[chosen] / downsample - 1) <= rtol:
        return Resolution(chosen, downsamples[chosen], False)
    return Resolution(chosen, float(downsample), True)


def resize(region: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an (h, w, C) uint8 region: area averaging when shrinking, bilinear when growing."""
    from PIL import Image

    h, w, c = region.shape
    if (h, w) == (height, width):
        return region
    shrink = width <= w and height <= h
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    if c == 3:
        return np.asarray(Image.fromarray(region).resize((width, height), method))
    planes = [
        np.asarray(Image.fromarray(region[..., i]).resize((width, height), method))
        for i in range(c)
    ]
    return np.stack(planes, axis=-1)


class PatchSource(abc.ABC):
    """Abstract base: a grid of square patches over one image, read lazily.

    Attributes:
        patch_size: P, patch side in pixels at the read resolution.
        stride: S, grid step in pixels at the read resolution.
        channels: C.
        coords: (N, 2) int64 level-0 (x, y) of each patch's top-left corner, raster order.
        level: pyramid level patches are read from (0 for plain images).
        downsample: level-0 pixels per read-resolution pixel.
        name: file name or a given name, used in error messages.
        mpp: microns per level-0 pixel, if known.
        background: value of pixels outside the image (0 for arrays, 255 = white for files).
        level_dimensions: (width, height) of every pyramid level.
        level_downsamples: level-0 pixels per pixel of every pyramid level.

    Subclasses set `name`, `channels`, `mpp`, `background`, `level_dimensions` and
    `level_downsamples`, implement `_open`, `_release` and `_read_level`, then call `_setup`.
    """

    patch_size: int
    stride: int
    channels: int
    coords: np.ndarray
    level: int
    downsample: float
    name: str
    mpp: float | None
    background: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    _transient: tuple[str, ...] = ()  # attributes holding open handles: dropped when pickled

    # ---- subclass hooks -------------------------------------------------------------------
    @abc.abstractmethod
    def _open(self) -> None:
        """Open file handles (called lazily, once per process)."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Close and forget file handles."""

    @abc.abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read the (height, width, C) uint8 region at (x, y) of `level`, fully inside it."""

    # ---- construction ---------------------------------------------------------------------
    def _init_file(self, path: str | os.PathLike, name: str | None, background: int) -> None:
        """Set `path` (checked to exist), `name` and `background` of a file-backed source and
        create its lock; the file is not opened yet."""
        self.path = check_path(path)
        self.name = name or self.path.name
        self.background = int(background)
        self._lock = threading.RLock()
        self._opened_pid = None

    def _setup(
        self,
        *,
        patch_size: int,
        stride: int | None = None,
        level: int | None = None,
        downsample: float | None = None,
        target_mpp: float | None = None,
        tissue: TissueSpec = None,
        min_tissue: float = 0.01,
        grid_cache: GridCache | None = None,
    ) -> None:
        """Choose the resolution, build the patch grid and apply the tissue filter.

        Args:
            patch_size: P, in pixels at the read resolution.
            stride: S, default P.
            level: pyramid level to read.
            downsample: level-0 pixels per read pixel (a level, or the next finer level
                resized).
            target_mpp: microns per read pixel; needs the file's or the given `mpp`.
            tissue: None, "otsu", a mask array or a mask image / GeoJSON path.
            min_tissue: lowest tissue fraction of a kept patch.
            grid_cache: where the kept ids of the tissue filter are looked up and stored.
        """
        if not hasattr(self, "_lock"):
            self._lock = threading.RLock()
            self._opened_pid: int | None = None
        if int(patch_size) != patch_size or patch_size < 1:
            raise InputError(f"{self.name}: patch_size must be a positive int, got {patch_size!r}")
        stride = patch_size if stride is None else stride
        if int(stride) != stride or stride < 1:
            raise InputError(f"{self.name}: stride must be a positive int, got {stride!r}")
        self.patch_size, self.stride = int(patch_size), int(stride)
        res = choose_resolution(
            self.level_downsamples,
            level=level,
            downsample=downsample,
            target_mpp=target_mpp,
            mpp=self.mpp,
            name=self.name,
        )
        self.level, self.downsample, self._resample = res
        width, height = self.read_size
        rows = (height - self.patch_size) // self.stride + 1 if height >= self.patch_size else 0
        cols = (width - self.patch_size) // self.stride + 1 if width >= self.patch_size else 0
        if rows == 0 or cols == 0:
            raise InputError(
                f"{self.name}: image is {width}x{height} at the read resolution, "
                f"smaller than patch_size {self.patch_size}"
            )
        self._grid_shape = (rows, cols)
        row, col = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
        self._rc = np.stack([row, col], axis=1)  # (N, 2) grid (row, col)
        self._origins: np.ndarray | None = None  # (N, 2) (y, x) read pixels; None: rc * S
        self.coords = self._level0_xy(self._rc)
        if tissue is not None:
            key = self._grid_key(tissue, min_tissue) if grid_cache is not None else None
            if key is None:
                keep = self._tissue_ids(tissue, min_tissue)
            else:
                keep = grid_cache.ids(key, lambda: self._tissue_ids(tissue, min_tissue))
            self._rc = self._rc[keep]
            self.coords = self.coords[keep]
        logger.debug(
            "%s: level %d, downsample %.3f, %d of %d patches",
            self.name,
            self.level,
            self.downsample,
            len(self._rc),
            rows * cols,
        )

    def _level0_xy(self, rc: np.ndarray) -> np.ndarray:
        xy = rc[:, ::-1].astype(np.float64) * (self.stride * self.downsample)
        return np.rint(xy).astype(np.int64)

    def _grid_key(self, tissue: TissueSpec, min_tissue: float) -> dict[str, Any] | None:
        """What decides the kept ids of this grid, for `GridCache`; None when the image is not
        a file (nothing identifies it across processes)."""
        path = getattr(self, "path", None)
        if path is None:
            return None
        if isinstance(tissue, np.ndarray):
            mask = np.ascontiguousarray(tissue.astype(bool))
            spec: Any = {
                "mask_array": hashlib.sha256(mask.tobytes()).hexdigest(),
                "shape": mask.shape,
            }
        elif isinstance(tissue, str) and tissue.lower() == "otsu":
            spec = {"otsu": TISSUE_THUMBNAIL_SIZE, "min_signal": MIN_SATURATION}
        else:
            spec = {"mask": file_identity(tissue)}
        return {
            "file": file_identity(path),
            "reader": type(self).__name__,
            "series": getattr(self, "_series", None),
            "background": self.background,
            "level": self.level,
            "downsample": self.downsample,
            "resample": self._resample,
            "patch_size": self.patch_size,
            "stride": self.stride,
            "grid": list(self._grid_shape),
            "tissue": spec,
            "min_tissue": float(min_tissue),
        }

    def _tissue_ids(self, tissue: TissueSpec, min_tissue: float) -> np.ndarray:
        if not 0 <= min_tissue <= 1:
            raise InputError(f"{self.name}: min_tissue must be in [0, 1], got {min_tissue}")
        if isinstance(tissue, str) and tissue.lower() == "otsu":
            thumb, mask_downsample = self._thumbnail(TISSUE_THUMBNAIL_SIZE)
            mask, threshold = otsu_threshold_mask(thumb)
            how = f"tissue='otsu', threshold {threshold:.3f}"
        elif isinstance(tissue, np.ndarray):
            mask = np.asarray(tissue).astype(bool)
            if mask.ndim != 2:
                raise InputError(
                    f"{self.name}: a tissue mask array must be (h, w), got {mask.shape}"
                )
            w0, h0 = self.level0_size
            mask_downsample = (w0 / mask.shape[1], h0 / mask.shape[0])
            how = "tissue mask array"
        else:
            mask, mask_downsample = load_tissue_mask(tissue, self.level0_size)
            how = f"tissue mask {Path(tissue).name}"
        ids = tissue_patch_ids(
            mask, mask_downsample, self.coords, self.patch_size_level0, min_tissue
        )
        if len(ids) == 0:
            raise EmptyTissueError(
                f"{self.name}: no patch has a tissue fraction >= min_tissue={min_tissue} "
                f"({how}; {mask.mean():.1%} of the mask is tissue)"
            )
        return ids

    # ---- the protocol ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rc)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the full patch grid, before tissue filtering."""
        return self._grid_shape

    @property
    def level0_size(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return tuple(self.level_dimensions[0])

    @property
    def patch_size_level0(self) -> float:
        """Patch side in level-0 pixels: P * downsample."""
        return self.patch_size * self.downsample

    @property
    def read_size(self) -> tuple[int, int]:
        """(width, height) of the image at the read resolution."""
        if not self._resample:
            return tuple(self.level_dimensions[self.level])
        w0, h0 = self.level0_size
        return int(w0 / self.downsample), int(h0 / self.downsample)

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(row, col) grid positions of patches. Args: ids: (n,). Returns: (n, 2) int64."""
        return self._rc[self._check_ids(ids)].copy()

    def read(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Read patches. Args: ids: (n,) ints in [0, N). Returns: uint8 (n, C, P, P), in order."""
        ids = self._check_ids(ids)
        p = self.patch_size
        out = np.empty((len(ids), self.channels, p, p), dtype=np.uint8)
        if len(ids) == 0:
            return out
        origins = self._origins_of(ids)  # (n, 2) (y, x) at the read resolution
        with self._lock:
            self._ensure_open()
            for i, (y, x) in enumerate(origins):
                out[i] = self._read_scaled(int(x), int(y), p, p).transpose(2, 0, 1)
        return out

    def _origins_of(self, ids: np.ndarray) -> np.ndarray:
        """(n, 2) (y, x) of patches' top-left corners at the read resolution."""
        if self._origins is not None:
            return self._origins[ids]
        return self._rc[ids] * self.stride

    def at_coords(self, coords: np.ndarray) -> PatchSource:
        """This image's patches at other places: a source whose patch i has its top-left
        corner at level-0 ``coords[i]`` (x, y), e.g. the tiles another tool cut.

        Args:
            coords: (n, 2) level-0 (x, y); patches may overlap, lie off the grid, or reach
                past the border (read as `background` there).

        Returns:
            A new source of n patches at the same resolution; `positions` are the grid cells
            (row, col) the corners fall in at this stride.
        """
        coords = np.asarray(coords)
        if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
            raise InputError(f"{self.name}: coords must be (n, 2) with n >= 1, got {coords.shape}")
        if coords.dtype.kind not in "iuf" or not np.isfinite(coords).all():
            raise InputError(f"{self.name}: coords must be finite numbers, got {coords.dtype}")
        other = copy.copy(self)
        other.__setstate__(self.__getstate__())  # own handles and lock
        origins = np.rint(coords[:, ::-1].astype(np.float64) / self.downsample).astype(np.int64)
        other._origins = origins
        other._rc = origins // self.stride
        other.coords = np.rint(coords).astype(np.int64)
        return other

    def __getitem__(self, ids: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        """Same as `read`; an int id returns one (C, P, P) patch."""
        if isinstance(ids, slice):
            return self.read(np.arange(len(self))[ids])
        if np.ndim(ids) == 0:
            return self.read([ids])[0]
        return self.read(ids)

    def read_region(self, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """Read any region at the read resolution; pixels outside the image get `background`.

        Args:
            location: level-0 (x, y) of the top-left corner.
            size: (width, height) in pixels at the read resolution.

        Returns:
            uint8 (C, height, width).
        """
        x = round(location[0] / self.downsample)
        y = round(location[1] / self.downsample)
        with self._lock:
            self._ensure_open()
            return self._read_scaled(x, y, int(size[0]), int(size[1])).transpose(2, 0, 1)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """A low-resolution view of the whole image, longest side at most `max_size`.

        Built from the coarsest pyramid level at least `max_size` large, averaged over integer
        blocks band by band, so even a single-level gigapixel image needs little memory.

        Returns:
            uint8 (h, w, C).
        """
        return self._thumbnail(max_size)[0]

    def close(self) -> None:
        """Close file handles; the next read reopens them."""
        with self._lock:
            self._release()
            self._opened_pid = None

    def __enter__(self) -> PatchSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, patches={len(self)}, "
            f"patch_size={self.patch_size}, level={self.level}, downsample={self.downsample:g})"
        )

    # ---- pickling and processes -----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in self._transient:
            state[key] = None
        state["_opened_pid"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _ensure_open(self) -> None:
        pid = os.getpid()
        if self._opened_pid != pid:
            # handles inherited through fork share file offsets with the parent: never reuse them
            self._release()
            self._open()
            self._opened_pid = pid

    # ---- reading helpers ------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        if hasattr(ids, "detach"):  # a torch tensor
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.size == 0:
            return np.zeros(0, dtype=np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(
                f"{self.name}: patch ids must be a 1-D sequence of ints, "
                f"got {arr.dtype} array of shape {arr.shape}"
            )
        bad = (arr < 0) | (arr >= len(self))
        if bad.any():
            raise IndexError(
                f"{self.name}: patch ids must be in [0, {len(self)}), got {int(arr[bad][0])}"
            )
        return arr.astype(np.int64, copy=False)

    def _read_scaled(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, C) at the read resolution, from read-resolution (x, y)."""
        if not self._resample:
            return self._read_padded(self.level, x, y, width, height)
        scale = self.downsample / self.level_downsamples[self.level]
        x0, y0 = round(x * scale), round(y * scale)
        x1 = max(round((x + width) * scale), x0 + 1)
        y1 = max(round((y + height) * scale), y0 + 1)
        return resize(self._read_padded(self.level, x0, y0, x1 - x0, y1 - y0), width, height)

    def _read_padded(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width, C) of `level`; the part outside the image is `background`."""
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lw), min(y + height, lh)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):
            return self._read_level(level, x, y, width, height)
        out = np.full((height, width, self.channels), self.background, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_level(
                level, x0, y0, x1 - x0, y1 - y0
            )
        return out

    def _thumbnail(self, max_size: int) -> tuple[np.ndarray, tuple[float, float]]:
        """Thumbnail and its (x, y) level-0 pixels per thumbnail pixel."""
        if max_size < 1:
            raise InputError(f"{self.name}: max_size must be >= 1, got {max_size}")
        dims, downs = self.level_dimensions, self.level_downsamples
        large = [k for k in range(len(dims)) if max(dims[k]) >= max_size]
        level = max(large, key=lambda k: downs[k]) if large else int(np.argmin(downs))
        width, height = dims[level]
        factor = max(1, max(width, height) // max_size)  # integer block averaging first
        out_w, out_h = max(1, width // factor), max(1, height // factor)
        out = np.empty((out_h, out_w, self.channels), dtype=np.uint8)
        band = max(1, _BAND_BYTES // (out_w * factor * factor * self.channels))  # output rows
        with self._lock:
            self._ensure_open()
            for r0 in range(0, out_h, band):
                n = min(band, out_h - r0)
                region = self._read_padded(level, 0, r0 * factor, out_w * factor, n * factor)
                if factor > 1:
                    blocks = region.reshape(n, factor, out_w, factor, self.channels)
                    region = np.rint(blocks.mean(axis=(1, 3), dtype=np.float32)).astype(np.uint8)
                out[r0 : r0 + n] = region
        if max(out_w, out_h) > max_size:  # then at most 2 x max_size: resize the rest of the way
            scale = max_size / max(out_w, out_h)
            out = resize(out, max(1, round(out_w * scale)), max(1, round(out_h * scale)))
        w0, h0 = self.level0_size
        return out, (
            w0 / width * out_w * factor / out.shape[1],
            h0 / height * out_h * factor / out.shape[0],
        )


OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".dcm", ".bif", ".vms", ".vmu", ".svslide"}
)
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".btf", ".tf2", ".tf8"})
TIFF_LIKE_SUFFIXES = frozenset({".svs", ".scn", ".bif"})  # tifffile reads these without OpenSlide
PILLOW_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
BACKENDS = ("auto", "openslide", "tifffile", "pillow")


def grid_options(
    grid: GridConfig, mask: TissueSpec = None, *, name: str = "image"
) -> dict[str, Any]:
    """The source keyword arguments of a grid: stride, resolution, tissue filter.

    Args:
        grid: the grid settings (``data.grid``).
        mask: this image's tissue mask (image or GeoJSON, or a boolean array); it wins over
            ``grid.tissue``.
        name: the image, for the error when ``grid.tissue`` is "mask" and there is none.
    """
    if mask is not None:
        tissue: TissueSpec = mask
    elif grid.tissue == "mask":
        raise InputError(
            f"{name}: data.grid.tissue is 'mask', but the image has no mask (a table's mask "
            "column gives one per row)"
        )
    else:
        tissue = "otsu" if grid.tissue == "otsu" else None
    options = {
        "stride": grid.stride,
        "level": grid.level,
        "downsample": grid.downsample,
        "target_mpp": grid.target_mpp,
        "mpp": grid.mpp,
        "tissue": tissue,
        "min_tissue": grid.min_tissue,
    }
    return {k: v for k, v in options.items() if v is not None}


def _openslide_format(path: Path) -> str | None:
    """OpenSlide's vendor name for `path`, or None when OpenSlide is missing or declines it."""
    try:
        openslide = importlib.import_module("openslide")
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # not installed, C library missing, or unreadable
        return None


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except (ImportError, OSError):
        return False


def open_source(
    path: str | os.PathLike,
    *,
    patch_size: int,
    grid: GridConfig | None = None,
    mask: TissueSpec = None,
    backend: str = "auto",
    **kwargs: Any,
) -> PatchSource:
    """Open an image or slide as a patch source, choosing the reader by suffix.

    auto: OpenSlide for slide formats (.svs .ndpi .mrxs .scn .dcm .bif .vms ...), falling back
    to tifffile for TIFF-based ones when OpenSlide is not installed; for .tif/.tiff OpenSlide
    when it accepts the file (tiled TIFF) and tifffile otherwise; Pillow for .png .jpg .jpeg
    .bmp .gif .webp; other suffixes are tried with OpenSlide, tifffile, then Pillow.

    Args:
        path: the file.
        patch_size: P.
        grid: the grid settings as one object (``data.grid``); then leave out the keyword
            arguments it sets (stride, level, downsample, target_mpp, mpp, tissue, min_tissue).
        mask: with ``grid``: this image's tissue mask (image or GeoJSON), which wins over
            ``grid.tissue``.
        backend: "auto", "openslide", "tifffile" or "pillow".
        **kwargs: passed to the source (stride, level, downsample, mpp, target_mpp, tissue,
            min_tissue, grid_cache, ...).

    Returns:
        OpenSlideSource, TiffSource or PillowSource.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable slide or image (one line, naming the path).
        ImportError: the reader the file needs is not installed.
    """
    from .pil import PillowSource
    from .slide import OpenSlideSource
    from .tiff import TiffSource

    classes = {"openslide": OpenSlideSource, "tifffile": TiffSource, "pillow": PillowSource}
    if grid is not None:
        options = grid_options(grid, mask, name=str(path))
        twice = sorted(set(options) & set(kwargs))
        if twice:
            raise InputError(f"open_source: {', '.join(twice)} given twice (in grid and alone)")
        kwargs.update(options)
    elif mask is not None:
        raise InputError("open_source: mask goes with grid; without one pass tissue=MASK")
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = check_path(path)
    if backend != "auto":
        return classes[backend](path, patch_size=patch_size, **kwargs)
    suffix = path.suffix.lower()
    if suffix in PILLOW_SUFFIXES:
        return PillowSource(path, patch_size=patch_size, **kwargs)
    if suffix in OPENSLIDE_SUFFIXES:
        if _installed("openslide"):
            return OpenSlideSource(path, patch_size=patch_size, **kwargs)
        if suffix in TIFF_LIKE_SUFFIXES and _installed("tifffile"):
            return TiffSource(path, patch_size=patch_size, **kwargs)
        raise MissingExtraError(WSI_EXTRA_HINT)
    if suffix in TIFF_SUFFIXES:
        if "series" not in kwargs and _openslide_format(path) is not None:
            try:
                return OpenSlideSource(path, patch_size=patch_size, **kwargs)
            except CannotReadError:
                logger.debug("%s: OpenSlide failed, trying tifffile", path)
        return TiffSource(path, patch_size=patch_size, **kwargs)
    # unknown suffix: whoever accepts it
    if _openslide_format(path) is not None:
        return OpenSlideSource(path, patch_size=patch_size, **kwargs)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TiffSource(path, patch_size=patch_size, **kwargs)
    return PillowSource(path, patch_size=patch_size, **kwargs)
