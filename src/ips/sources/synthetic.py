"""Synthetic H&E-like pyramidal slides for tests, demos and benchmarks.

The picture is a function of continuous level-0 coordinates (white glass, a few pink tissue
blobs with a purple texture, optional darker "lesions"), evaluated tile by tile, so any size can
be written with the memory of one tile and every tile agrees with its neighbours. Level k is the
same function sampled every 2**k level-0 pixels, with each texture wave damped exactly as a
2**k x 2**k box average damps it, so reduced levels match box-downsampled level 0 (up to the
soft tissue borders and compression).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ips.errors import InputError
from ips.files import atomic_write

from .base import require

_EOSIN = np.array([236.0, 160.0, 200.0], dtype=np.float32)  # pink stroma
_HEMATOXYLIN = np.array([110.0, 60.0, 160.0], dtype=np.float32)  # purple nuclei
_LESION = np.array([70.0, 25.0, 115.0], dtype=np.float32)  # dense dark purple


@dataclass(frozen=True, eq=False)
class SyntheticSlide:
    """What `write_synthetic_slide` wrote."""

    path: Path  # the pyramidal BigTIFF
    width: int  # level-0 width in pixels
    height: int  # level-0 height in pixels
    levels: int  # pyramid levels; level k is level 0 reduced 2**k times (sizes floored)
    tile_size: int  # tile side in pixels, on every level
    mpp: float  # microns per level-0 pixel
    lesion_boxes: tuple[
        tuple[int, int, int, int], ...
    ] = ()  # (x0, y0, x1, y1) level-0, end-exclusive
    lesion_polygons: tuple[np.ndarray, ...] = field(default=())  # (K, 2) level-0 (x, y) outlines

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of a pyramid level."""
        return max(1, self.width >> level), max(1, self.height >> level)


@dataclass(frozen=True)
class _Ellipse:
    cx: float  # centre, level-0 pixels
    cy: float
    a: float  # semi-axes, level-0 pixels
    b: float
    angle: float  # radians
    edge: float  # width of the soft border, as a fraction of the radius

    def soft_edge(self, factor: int) -> float:
        """Border width in radius units, widened as averaging `factor` samples widens it."""
        radius = math.sqrt(self.a * self.b)
        return math.sqrt(self.edge**2 + (factor**2 - 1) / radius**2)

    def bbox(self, factor: int = 1) -> tuple[float, float, float, float]:
        c, s, r = math.cos(self.angle), math.sin(self.angle), 1 + self.soft_edge(factor) / 2
        ex = r * math.hypot(self.a * c, self.b * s)
        ey = r * math.hypot(self.a * s, self.b * c)
        return self.cx - ex, self.cy - ey, self.cx + ex, self.cy + ey

    def density(self, xs: np.ndarray, ys: np.ndarray, factor: int = 1) -> np.ndarray:
        """Coverage in [0, 1] at sample points. Args: xs: (w,), ys: (h,). Returns: (h, w)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx = (xs - self.cx).astype(np.float32)[None, :]
        dy = (ys - self.cy).astype(np.float32)[:, None]
        u = (dx * c + dy * s) / self.a
        v = (dy * c - dx * s) / self.b
        rho = np.sqrt(u * u + v * v)
        return np.clip((1 - rho) / self.soft_edge(factor) + 0.5, 0, 1)

    def outline(self, points: int = 64) -> np.ndarray:
        """(points, 2) level-0 (x, y) on the half-density contour."""
        t = np.linspace(0, 2 * np.pi, points, endpoint=False)
        u, v = self.a * np.cos(t), self.b * np.sin(t)
        c, s = math.cos(self.angle), math.sin(self.angle)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], axis=1)


def _damping(omega: np.ndarray, factor: int) -> np.ndarray:
    """How much averaging `factor` consecutive samples damps cos(omega * x)."""
    if factor == 1:
        return np.ones_like(omega)
    return np.sin(omega * factor / 2) / (factor * np.sin(omega / 2))


class _Texture:
    """Sum of separable cosine waves, values in [-1, 1]."""

    def __init__(
        self, rng: np.random.Generator, waves: int, wavelengths: tuple[float, float]
    ) -> None:
        self.omega = 2 * np.pi / rng.uniform(*wavelengths, size=(waves, 2))  # (waves, x/y)
        self.phase = rng.uniform(0, 2 * np.pi, size=(waves, 2))
        self.amplitude = np.full(waves, 1.0 / waves)

    def __call__(self, xs: np.ndarray, ys: np.ndarray, factor: int) -> np.ndarray:
        """Box-averaged texture at sample centres. Args: xs: (w,), ys: (h,). Returns: (h, w)."""
        gain = (
            self.amplitude * _damping(self.omega[:, 0], factor) * _damping(self.omega[:, 1], factor)
        )
        cx = np.cos(self.omega[:, :1] * xs[None, :] + self.phase[:, :1]).astype(
            np.float32
        )  # (waves, w)
        cy = np.cos(self.omega[:, 1:] * ys[None, :] + self.phase[:, 1:]).astype(
            np.float32
        )  # (waves, h)
        return (cy.T * gain.astype(np.float32)) @ cx  # (h, waves) @ (waves, w)


class _Scene:
    """The synthetic slide as a function of level-0 coordinates."""

    def __init__(
        self,
        width: int,
        height: int,
        *,
        seed: int,
        blobs: int | None,
        lesions: int,
        background: int,
    ) -> None:
        rng = np.random.default_rng(seed)
        size = min(width, height)
        count = int(rng.integers(3, 7)) if blobs is None else blobs
        self.tissue = []
        for _ in range(count):
            a = rng.uniform(0.10, 0.22) * size
            self.tissue.append(
                _Ellipse(
                    cx=rng.uniform(0.22, 0.78) * width,
                    cy=rng.uniform(0.22, 0.78) * height,
                    a=a,
                    b=a * rng.uniform(0.55, 1.0),
                    angle=rng.uniform(0, np.pi),
                    edge=0.06,
                )
            )
        if lesions and not self.tissue:
            raise InputError("lesions need tissue: tissue_blobs must be > 0")
        self.lesions = []
        for _ in range(lesions):
            host = self.tissue[int(rng.integers(len(self.tissue)))]
            r, phi = rng.uniform(0, 0.4), rng.uniform(0, 2 * np.pi)
            u, v = r * host.a * math.cos(phi), r * host.b * math.sin(phi)
            c, s = math.cos(host.angle), math.sin(host.angle)
            la = rng.uniform(0.15, 0.3) * host.b
            self.lesions.append(
                _Ellipse(
                    cx=host.cx + u * c - v * s,
                    cy=host.cy + u * s + v * c,
                    a=la,
                    b=la * rng.uniform(0.6, 1.0),
                    angle=rng.uniform(0, np.pi),
                    edge=0.1,
                )
            )
        self.texture = _Texture(rng, waves=4, wavelengths=(10.0, 40.0))
        self.lesion_texture = _Texture(rng, waves=4, wavelengths=(5.0, 14.0))
        self.background = float(background)

    @staticmethod
    def _touching(shapes: list[_Ellipse], box: tuple, factor: int) -> list[_Ellipse]:
        """The shapes reaching into a level-0 box (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        out = []
        for e in shapes:
            bx0, by0, bx1, by1 = e.bbox(factor)
            if bx0 < x1 and bx1 > x0 and by0 < y1 and by1 > y0:
                out.append(e)
        return out

    def render(self, xs: np.ndarray, ys: np.ndarray, factor: int) -> np.ndarray | None:
        """RGB at sample centres xs (w,), ys (h,) spaced `factor` apart; None when only glass."""
        half = factor / 2
        box = (xs[0] - half, ys[0] - half, xs[-1] + half, ys[-1] + half)
        blobs = self._touching(self.tissue, box, factor)
        if not blobs:
            return None
        t = blobs[0].density(xs, ys, factor)
        for e in blobs[1:]:
            np.maximum(t, e.density(xs, ys, factor), out=t)
        normal = 0.35 + 0.25 * self.texture(xs, ys, factor)  # hematoxylin share in [0.1, 0.6]
        lesions = self._touching(self.lesions, box, factor)
        if lesions:
            lesion = lesions[0].density(xs, ys, factor)
            for e in lesions[1:]:
                np.maximum(lesion, e.density(xs, ys, factor), out=lesion)
            dense = 0.7 + 0.3 * self.lesion_texture(xs, ys, factor)  # in [0.4, 1.0]
            q_lesion = t * lesion * dense
            q_normal = t * (1 - lesion) * normal
        else:
            q_lesion = None
            q_normal = t * normal
        out = np.empty((len(ys), len(xs), 3), dtype=np.uint8)
        bg = self.background
        for ch in range(3):
            value = bg + (_EOSIN[ch] - bg) * t + (_HEMATOXYLIN[ch] - _EOSIN[ch]) * q_normal
            if q_lesion is not None:
                value += (_LESION[ch] - _EOSIN[ch]) * q_lesion
            out[..., ch] = np.clip(value + 0.5, 0, 255)
        return out


def write_synthetic_slide(
    path: str | os.PathLike,
    *,
    width: int,
    height: int,
    tile_size: int = 256,
    levels: int | None = None,
    mpp: float = 0.5,
    seed: int = 0,
    lesions: int = 0,
    tissue_blobs: int | None = None,
    background: int = 255,
    compression: str | None = "jpeg",
    quality: int = 90,
) -> SyntheticSlide:
    """Write a tiled pyramidal BigTIFF of a synthetic H&E-like slide, one tile at a time.

    Layout: level 0 as a tiled page (NewSubfileType 0), then each reduced level as its own page
    (NewSubfileType 1), halving each time; resolution tags in centimetres (10**4 / mpp pixels
    per cm), which OpenSlide reports as `openslide.mpp-x`. Both OpenSlide (generic-tiff) and
    tifffile read the pyramid. Memory stays at a few tiles whatever the size.

    Args:
        path: the file to write (replaced atomically).
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        tile_size: tile side, a multiple of 16.
        levels: pyramid levels; default halves until a level fits in one tile.
        mpp: microns per level-0 pixel.
        seed: fixes the picture.
        lesions: number of lesion regions, each inside a tissue blob.
        tissue_blobs: number of tissue blobs; default 3 to 6, 0 for a blank slide.
        background: grey value of the glass.
        compression: "jpeg", "zlib", None, or another tifffile codec name.
        quality: JPEG quality.

    Returns:
        SyntheticSlide with the path and lesion outlines in level-0 pixels.
    """
    tifffile = require("tifffile")
    if width < 1 or height < 1:
        raise InputError(f"width and height must be >= 1, got {width}x{height}")
    if tile_size < 16 or tile_size % 16:
        raise InputError(f"tile_size must be a positive multiple of 16, got {tile_size}")
    if levels is None:
        levels = 1
        while max(width >> (levels - 1), height >> (levels - 1)) > tile_size:
            levels += 1
    if levels < 1:
        raise InputError(f"levels must be >= 1, got {levels}")
    scene = _Scene(
        width, height, seed=seed, blobs=tissue_blobs, lesions=lesions, background=background
    )
    glass = np.full((tile_size, tile_size, 3), background, dtype=np.uint8)
    steps = np.arange(tile_size, dtype=np.float64) + 0.5

    def tiles(level_width: int, level_height: int, factor: int) -> Iterator[np.ndarray]:
        for ty in range(0, level_height, tile_size):
            ys = (ty + steps) * factor
            for tx in range(0, level_width, tile_size):
                tile = scene.render((tx + steps) * factor, ys, factor)
                yield glass if tile is None else tile

    path = Path(path)
    options = {}
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    with atomic_write(path, "w+b") as fh, tifffile.TiffWriter(fh, bigtiff=True) as tif:
        for level in range(levels):
            factor = 2**level
            level_width, level_height = max(1, width >> level), max(1, height >> level)
            tif.write(
                tiles(level_width, level_height, factor),
                shape=(level_height, level_width, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                photometric="rgb",
                compression=compression,
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / (mpp * factor), 1e4 / (mpp * factor)),
                resolutionunit="CENTIMETER",
                metadata=None,
                software="ips.sources.synthetic",
                **options,
            )
    boxes = []
    for e in scene.lesions:
        x0, y0, x1, y1 = e.bbox()
        boxes.append(
            (
                max(0, math.floor(x0)),
                max(0, math.floor(y0)),
                min(width, math.ceil(x1)),
                min(height, math.ceil(y1)),
            )
        )
    return SyntheticSlide(
        path=path,
        width=width,
        height=height,
        levels=levels,
        tile_size=tile_size,
        mpp=mpp,
        lesion_boxes=tuple(boxes),
        lesion_polygons=tuple(e.outline() for e in scene.lesions),
    )
