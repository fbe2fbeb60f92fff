"""Patches of large plain, tiled and pyramidal TIFF files, read with tifffile.

Only the tiles (or strips) a region touches are read and decoded, one by one, through
tifffile's own segment decoder (the one its zarr store uses), and kept in a small LRU cache;
uncompressed contiguous images are memory-mapped instead. Nothing reads a whole level, except
`thumbnail` on a file without a small enough level, which then streams it band by band.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ips.errors import InputError

from .base import CannotReadError, PatchSource, cannot_read, require

_PHOTOMETRIC_MINISWHITE, _PHOTOMETRIC_MINISBLACK, _PHOTOMETRIC_RGB, _PHOTOMETRIC_PALETTE = (
    0,
    1,
    2,
    3,
)
_PHOTOMETRIC_YCBCR = 6
_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA = 1, 2


SHARED_CACHE_MB = 64  # decoded tiles held for all TiffSources of a process together


class _TileCache:
    """Decoded segments by key, least recently used dropped first, bounded in bytes; safe to
    use from several threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[Any, np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bool, np.ndarray | None]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return True, self._items[key]
        return False, None

    def put(self, key: Any, value: np.ndarray | None) -> None:
        size = 0 if value is None else value.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= 0 if old is None else old.nbytes


_SHARED: dict[int, _TileCache] = {}  # process id -> the cache of that process


def shared_tile_cache() -> _TileCache:
    """This process's tile cache for every TiffSource without a cache of its own: its memory
    stays the same however many sources are open (a batch of slides) and however large
    they are."""
    pid = os.getpid()
    if pid not in _SHARED:
        _SHARED.clear()  # a forked child: the parent's tiles are not its own
        _SHARED[pid] = _TileCache(SHARED_CACHE_MB * 2**20)
    return _SHARED[pid]


class _Level:
    """Geometry and decoding of one pyramid level (one TIFF page) of an open file."""

    def __init__(self, tif: Any, page: Any, background: int) -> None:
        keyframe = (
            page.keyframe if hasattr(page, "keyframe") and page.keyframe is not None else page
        )
        self.width, self.height = int(keyframe.imagewidth), int(keyframe.imagelength)
        self.samples = int(keyframe.samplesperpixel)
        if getattr(keyframe, "imagedepth", 1) > 1:
            raise InputError("volumetric (ImageDepth > 1) TIFF pages are not supported")
        if keyframe.dtype is None:
            raise InputError(
                f"sample format {keyframe.sampleformat}/{keyframe.bitspersample} bits not supported"
            )
        self.dtype = np.dtype(keyframe.dtype)
        if not (self.dtype == np.uint8 or self.dtype == np.uint16 or self.dtype.kind in "bf"):
            raise InputError(
                f"{self.dtype} pixels are not supported (expected uint8, uint16 or float)"
            )
        self.photometric = int(keyframe.photometric)
        if self.photometric not in (
            _PHOTOMETRIC_MINISWHITE,
            _PHOTOMETRIC_MINISBLACK,
            _PHOTOMETRIC_RGB,
            _PHOTOMETRIC_PALETTE,
            _PHOTOMETRIC_YCBCR,
        ):
            raise InputError(
                f"photometric interpretation {keyframe.photometric!r} is not supported"
            )
        self.separate = int(keyframe.planarconfig) == 2 and self.samples > 1
        self.tiled = bool(keyframe.is_tiled)
        if self.tiled:
            self.seg_w, self.seg_h = int(keyframe.tilewidth), int(keyframe.tilelength)
        else:
            self.seg_w, self.seg_h = self.width, int(min(keyframe.rowsperstrip, self.height))
        self.nx = math.ceil(self.width / self.seg_w)
        self.ny = math.ceil(self.height / self.seg_h)
        # numpy copies: tifffile holds these as tuples of Python ints (~40 bytes per tile each),
        # which the open file is closed to release (see TiffSource._open); unsigned, as in the
        # file, so that no offset a file can hold overflows
        self.offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
        self.bytecounts = np.asarray(page.databytecounts, dtype=np.uint64)
        per_plane = self.nx * self.ny
        if len(self.offsets) < per_plane * (self.samples if self.separate else 1):
            raise InputError(f"page has {len(self.offsets)} segments, expected {per_plane}")
        if len(self.bytecounts) != len(self.offsets):
            raise InputError(
                f"page has {len(self.offsets)} segment offsets but {len(self.bytecounts)} "
                "byte counts"
            )
        self.decode = keyframe.decode  # tifffile's segment decoder (cached per page shape)
        self.decode_args: dict[str, Any] = {}
        if keyframe.jpegtables is not None:
            self.decode_args["jpegtables"] = keyframe.jpegtables
        if getattr(keyframe, "jpegheader", None) is not None:
            self.decode_args["jpegheader"] = keyframe.jpegheader
        extras = tuple(keyframe.extrasamples or ())
        colors = 3 if self.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR) else 1
        self.alpha = extras[0] if extras and self.samples == colors + len(extras) else None
        if self.photometric == _PHOTOMETRIC_PALETTE:
            colormap = np.asarray(keyframe.colormap)
            scale = 257 if colormap.max() > 255 else 1
            self.lut = (colormap // scale).astype(np.uint8).T  # (entries, 3)
            self.channels = 3
        elif self.photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
            self.lut = None
            self.channels = 3
        elif self.alpha is not None:
            self.lut = None
            self.channels = 1
        else:
            self.lut = None
            self.channels = self.samples
        self.background = background
        self.memmap = None
        self._mappable = keyframe.is_memmappable and not self.separate and page is keyframe
        self._byteorder = tif.byteorder

    def map(self, path: str) -> None:
        """Memory-map a contiguous uncompressed level (after `check_extent` passed)."""
        if self._mappable:
            self.memmap = np.memmap(
                path,
                dtype=self.dtype.newbyteorder(self._byteorder),
                mode="r",
                offset=int(self.offsets[0]),
                shape=(self.height, self.width, self.samples),
            )

    def segment_name(self, index: int) -> str:
        """``tile (row 3, col 5)`` or ``strip 3`` (of sample plane s) for segment `index`."""
        plane, index = divmod(index, self.nx * self.ny)
        row, col = divmod(index, self.nx)
        name = f"tile (row {row}, col {col})" if self.tiled else f"strip {row}"
        return f"{name} of sample plane {plane}" if self.separate else name

    def past_the_end(self, level: int, index: int, size: int, more: int = 0) -> str:
        """The one-line reason for a segment whose data does not lie inside the file."""
        also = f"; so do {more} more of level {level}" if more else ""
        return (
            f"level {level} {self.segment_name(index)} at byte offset {int(self.offsets[index])} "
            f"({int(self.bytecounts[index])} bytes) runs past the end of the file ({size} "
            f"bytes){also}; the file is truncated or corrupt"
        )

    def check_extent(self, level: int, size: int) -> str | None:
        """Why the segments a read may touch do not all lie inside a file of `size` bytes, or
        None when they do; absent segments (offset or byte count 0) read as background."""
        needed = self.nx * self.ny * (self.samples if self.separate else 1)
        offsets, counts = self.offsets[:needed], self.bytecounts[:needed]
        end = np.uint64(size)
        # unsigned, so offset + count cannot overflow: compare count with what follows offset
        past = (
            (offsets > 0)
            & (counts > 0)
            & ((offsets > end) | (counts > end - np.minimum(offsets, end)))
        )
        if past.any():
            bad = np.flatnonzero(past)
            return self.past_the_end(level, int(bad[0]), size, more=len(bad) - 1)
        if self._mappable:  # one contiguous block, read whole through a memory map
            offset = int(offsets[0])
            nbytes = self.width * self.height * self.samples * self.dtype.itemsize
            if offset + nbytes > size:
                return (
                    f"level {level}: its uncompressed image at byte offset {offset} ({nbytes} "
                    f"bytes) runs past the end of the file ({size} bytes); the file is "
                    "truncated or corrupt"
                )
        return None

    def normalize(self, raw: np.ndarray) -> np.ndarray:
        """Raw samples (h, w, S) -> uint8 (h, w, C): palette, bit depth, inversion, alpha."""
        if self.lut is not None:
            return self.lut[np.minimum(raw[..., 0], len(self.lut) - 1)]
        if raw.dtype == np.uint8:
            values = raw
        elif raw.dtype == np.uint16:
            values = (raw >> 8).astype(np.uint8)
        elif raw.dtype.kind == "b":
            values = raw.astype(np.uint8) * 255
        else:
            values = np.clip(raw.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if self.photometric == _PHOTOMETRIC_MINISWHITE:
            values = 255 - values
        if self.alpha is None:
            return values[..., : self.channels]
        color = values[..., : self.channels].astype(np.uint16)
        alpha = values[..., -1:].astype(np.uint16)
        back = (255 - alpha) * self.background
        if self.alpha == _ASSOCIATED_ALPHA:  # premultiplied
            return np.minimum(color + (back + 127) // 255, 255).astype(np.uint8)
        return ((color * alpha + back + 127) // 255).astype(np.uint8)


def _tiff_mpp(tif: Any, page: Any) -> float | None:
    """Microns per level-0 pixel from Aperio, OME or resolution tags; None when unknown."""
    description = page.description or ""
    if tif.is_svs:
        match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
        if match:
            return float(match.group(1))
    if tif.is_ome:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', description)
        if match:
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', description)
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(
                unit.group(1) if unit else "µm"
            )
            if scale is not None:
                return float(match.group(1)) * scale
    try:
        xres = float(page.resolution[0])
        unit = int(page.resolutionunit)
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    if xres <= 0:
        return None
    microns = {3: 1e4, 4: 1e3, 5: 1.0}.get(unit)  # centimeter, millimeter, micrometer
    if microns is not None:
        return microns / xres
    if unit == 2 and xres >= 1000:  # inch; screen defaults such as 72 or 300 dpi are not scans
        return 25400.0 / xres
    return None


class TiffSource(PatchSource):
    """A patch grid over a TIFF file: plain (strips), tiled, or pyramidal.

    Pyramids are found by tifffile: reduced-resolution pages after level 0 (NewSubfileType 1),
    SubIFDs, SVS and OME-TIFF levels of the first (or `series`-th) image series. Only the
    tiles a read touches are decoded. Pixels outside the image are `background` (255, white,
    the pathology convention; also used for missing tiles and to composite transparency).

    Args:
        path: the file.
        patch_size: P, in pixels at the read resolution.
        **grid: the patch grid: stride, level, downsample, target_mpp, tissue, min_tissue,
            grid_cache (see `PatchSource._setup`).
        mpp: microns per level-0 pixel, overriding the file's.
        name: used in error messages; default the file name.
        background: value of pixels outside the image.
        series: which tifffile image series to read.
        cache_mb: size of a decoded-tile cache of its own (per process); default None: the
            process's shared cache (`SHARED_CACHE_MB` for all TiffSources together).
    """

    _transient = ("_file", "_levels", "_cache")

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        patch_size: int,
        mpp: float | None = None,
        name: str | None = None,
        background: int = 255,
        series: int = 0,
        cache_mb: float | None = None,
        **grid: Any,
    ) -> None:
        require("tifffile")
        self._init_file(path, name, background)
        self._series = int(series)
        self._cache_bytes = None if cache_mb is None else int(cache_mb * 2**20)
        self._file = self._levels = self._cache = None
        self._key: tuple = ()
        self._file_mpp: float | None = None
        with self._lock:
            try:
                self._open()
                self._opened_pid = os.getpid()
                levels = self._levels
                channels = {lv.channels for lv in levels}
                if len(channels) != 1:
                    raise InputError(
                        f"pyramid levels have different channel counts {sorted(channels)}"
                    )
                file_mpp = self._file_mpp
            except CannotReadError:  # names the file already
                self._release()
                raise
            except Exception as exc:
                self._release()
                raise cannot_read(self.path, exc) from None
        self.channels = channels.pop()
        self.mpp = mpp if mpp is not None else file_mpp
        w0, h0 = levels[0].width, levels[0].height
        self.level_dimensions = tuple((lv.width, lv.height) for lv in levels)
        self.level_downsamples = tuple((w0 / lv.width + h0 / lv.height) / 2 for lv in levels)
        try:
            self._setup(patch_size=patch_size, **grid)
        finally:
            self.close()

    def _open(self) -> None:
        """Parse the file once, keep per level what reading needs, then close tifffile.

        tifffile keeps every page's tile offsets and byte counts as tuples of Python ints,
        about 80 bytes per tile: 20 MiB for a slide of 250,000 tiles. The levels keep numpy
        copies and the segment decoders instead, and tiles are read through a plain handle.
        """
        tifffile = require("tifffile")
        try:  # also when a worker process reopens the file: a CannotReadError naming it
            levels = self._parse(tifffile)
            handle = open(self.path, "rb")  # noqa: SIM115 (closed in _release)
        except Exception as exc:
            raise cannot_read(self.path, exc) from None
        try:
            self._check_extents(levels, os.fstat(handle.fileno()).st_size)
        except BaseException:
            handle.close()
            raise
        self._file = handle
        self._levels = levels
        if self._cache_bytes is None:
            self._cache = shared_tile_cache()
            stat = os.stat(self.path)
            self._key = (str(self.path.resolve()), stat.st_size, stat.st_mtime_ns, self._series)
        else:
            self._cache = _TileCache(self._cache_bytes)
            self._key = ()

    def _parse(self, tifffile: Any) -> list[_Level]:
        """The levels of the chosen series, largest first."""
        with tifffile.TiffFile(self.path) as tif:
            if not tif.series:
                raise InputError("no image in file")
            if not 0 <= self._series < len(tif.series):
                raise InputError(f"series must be in [0, {len(tif.series)}), got {self._series}")
            series = tif.series[self._series]
            pages = [lv.pages[0] for lv in series.levels]
            levels = [_Level(tif, page, self.background) for page in pages]
            self._file_mpp = _tiff_mpp(tif, pages[0])
        return sorted(levels, key=lambda lv: -lv.width * lv.height)

    def _check_extents(self, levels: list[_Level], size: int) -> None:
        """Refuse tiles whose data would lie past the end of the file (`size` bytes): a
        truncated file fails when opened, naming a tile, not in the middle of a run. Then
        memory-map the levels that can be."""
        for k, lv in enumerate(levels):
            reason = lv.check_extent(k, size)
            if reason is not None:
                raise CannotReadError(f"{self.path}: {reason}")
            try:
                lv.map(str(self.path))
            except (OSError, ValueError) as exc:
                raise cannot_read(self.path, exc) from None

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._levels = self._cache = None

    def _decode_segment(self, level: int, index: int) -> np.ndarray | None:
        """Read and decode one tile or strip. Returns: raw (h, w, S), or None when absent."""
        lv = self._levels[level]
        offset, count = int(lv.offsets[index]), int(lv.bytecounts[index])
        if offset == 0 or count == 0:
            return None
        self._file.seek(offset)
        data = self._file.read(count)
        if len(data) != count:  # the file shrank since it was opened
            size = os.fstat(self._file.fileno()).st_size
            raise CannotReadError(f"{self.path}: {lv.past_the_end(level, index, size)}")
        try:
            segment = lv.decode(data, index, **lv.decode_args)[0]
        except Exception as exc:  # codec errors have many types (Jpeg8Error, zlib.error, ...)
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise CannotReadError(
                f"{self.path}: tile {index} of level {level} cannot be decoded ({reason})"
            ) from None
        if segment is None:
            return None
        return segment.reshape(segment.shape[-3:])  # (1, h, w, S) -> (h, w, S)

    def _segment(self, level: int, ty: int, tx: int) -> np.ndarray | None:
        """Decoded uint8 (h, w, C) segment at tile row `ty`, column `tx`, through the cache."""
        key = (*self._key, level, ty, tx)  # the file's identity where the cache is shared
        hit, value = self._cache.get(key)
        if hit:
            return value
        lv = self._levels[level]
        index = ty * lv.nx + tx
        if lv.separate:
            planes = [
                self._decode_segment(level, s * lv.nx * lv.ny + index) for s in range(lv.samples)
            ]
            raw = None if any(p is None for p in planes) else np.concatenate(planes, axis=-1)
        else:
            raw = self._decode_segment(level, index)
        value = None if raw is None else lv.normalize(raw)
        self._cache.put(key, value)
        return value

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        lv = self._levels[level]
        if lv.memmap is not None:
            return np.ascontiguousarray(lv.normalize(lv.memmap[y : y + height, x : x + width]))
        out = np.full((height, width, self.channels), self.background, dtype=np.uint8)
        for ty in range(y // lv.seg_h, (y + height - 1) // lv.seg_h + 1):
            for tx in range(x // lv.seg_w, (x + width - 1) // lv.seg_w + 1):
                segment = self._segment(level, ty, tx)
                if segment is None:
                    continue
                sy, sx = ty * lv.seg_h, tx * lv.seg_w  # segment origin in the level
                y0, y1 = max(y, sy), min(y + height, sy + segment.shape[0])
                x0, x1 = max(x, sx), min(x + width, sx + segment.shape[1])
                if y1 > y0 and x1 > x0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = segment[
                        y0 - sy : y1 - sy, x0 - sx : x1 - sx
                    ]
        return out
