"""Tissue masks: which patches of a slide show tissue.

Three ways to get a mask, all ending in `tissue_patch_ids`:
- `otsu_tissue_mask` on a thumbnail (automatic, for brightfield H&E-like slides);
- a mask image of any size, scaled to the slide (non-zero pixels are tissue);
- a GeoJSON file of polygons in level-0 pixels (e.g. a QuPath export), rasterised here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ips.errors import InputError, MissingExtraError, MissingFileError

MIN_SATURATION = 0.05  # floor on the Otsu threshold: keeps JPEG noise on blank glass out
MASK_MAX_SIZE = 4096  # longest side of a rasterised GeoJSON mask


class EmptyTissueError(InputError):
    """No patch of a slide passes the tissue filter."""


def tissue_signal(image: np.ndarray) -> np.ndarray:
    """How tissue-like each pixel looks, in [0, 1].

    RGB: HSV saturation, (max - min) / max over the channels, which is near 0 on white or grey
    glass and on black borders, and high on stained tissue. One channel: darkness, 1 - value/255.

    Args:
        image: uint8 (h, w, C) or (h, w).

    Returns:
        float32 (h, w).
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise InputError(f"image must be (h, w) or (h, w, C), got {img.shape}")
    if img.shape[-1] < 3:
        return 1.0 - img[..., 0].astype(np.float32) / 255.0
    if img.dtype != np.uint8:
        img = img.astype(np.float32)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]  # per-plane maxima: ~10x a max over axis -1
    high = np.maximum(np.maximum(r, g), b)
    low = np.minimum(np.minimum(r, g), b)
    spread = (high - low).astype(np.float32)  # exact in uint8: high >= low
    return spread / np.maximum(high.astype(np.float32), 1e-6)  # 0 where high is 0 (so is low)


def otsu_threshold_mask(
    image: np.ndarray, *, min_signal: float = MIN_SATURATION
) -> tuple[np.ndarray, float]:
    """`otsu_tissue_mask` and the threshold it used (a constant image has no tissue)."""
    try:
        from skimage.filters import threshold_otsu
    except ImportError as exc:
        raise MissingExtraError(
            "reading slides needs: pip install 'iterative-patch-selection[wsi]'"
        ) from exc
    signal = tissue_signal(image)
    if signal.size == 0 or float(signal.max() - signal.min()) < 1e-6:
        threshold = max(float(signal.max()) if signal.size else 0.0, min_signal)
        return np.zeros(signal.shape, dtype=bool), threshold
    threshold = max(float(threshold_otsu(signal)), min_signal)
    return signal > threshold, threshold


def otsu_tissue_mask(thumbnail: np.ndarray, *, min_signal: float = MIN_SATURATION) -> np.ndarray:
    """Tissue mask of a thumbnail by Otsu's threshold on `tissue_signal` (saturation for RGB).

    The threshold is never below `min_signal`, so blank or near-constant slides give no tissue.

    Args:
        thumbnail: uint8 (h, w, C) or (h, w).
        min_signal: lowest threshold on the signal in [0, 1].

    Returns:
        bool (h, w).
    """
    return otsu_threshold_mask(thumbnail, min_signal=min_signal)[0]


def tissue_patch_ids(
    mask: np.ndarray,
    mask_downsample: float | tuple[float, float],
    coords: np.ndarray,
    patch_size_level0: float,
    min_fraction: float = 0.01,
) -> np.ndarray:
    """Ids of the patches whose tissue fraction is at least `min_fraction`.

    The fraction is the mean of the mask over the mask pixels the patch overlaps.

    Args:
        mask: bool (h, w), True on tissue.
        mask_downsample: level-0 pixels per mask pixel, one number or (x, y).
        coords: (N, 2) level-0 (x, y) of the patches' top-left corners.
        patch_size_level0: patch side in level-0 pixels.
        min_fraction: lowest tissue fraction kept, in [0, 1].

    Returns:
        int64 (n,) ids into `coords`, increasing.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise InputError(f"mask must be (h, w), got {mask.shape}")
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    dsx, dsy = (
        (mask_downsample, mask_downsample) if np.isscalar(mask_downsample) else mask_downsample
    )
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), dtype=np.int64)  # summed-area table
    table[1:, 1:] = mask.cumsum(axis=0, dtype=np.int64).cumsum(axis=1)
    x0 = np.clip(np.floor(coords[:, 0] / dsx + 1e-9), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] / dsy + 1e-9), 0, h).astype(np.int64)
    x1 = np.clip(np.ceil((coords[:, 0] + patch_size_level0) / dsx - 1e-9), 0, w).astype(np.int64)
    y1 = np.clip(np.ceil((coords[:, 1] + patch_size_level0) / dsy - 1e-9), 0, h).astype(np.int64)
    area = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    fraction = np.where(area > 0, inside / np.maximum(area, 1), 0.0)
    return np.flatnonzero(fraction >= min_fraction).astype(np.int64)


def load_tissue_mask(
    path: str | os.PathLike,
    level0_size: tuple[int, int],
    *,
    downsample: float | None = None,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Read a user mask: a GeoJSON (.json/.geojson) of polygons, or a mask image.

    Args:
        path: GeoJSON with polygons in level-0 pixels, or an image whose non-zero pixels are
            tissue (any size: it is stretched over the whole slide).
        level0_size: (width, height) of the slide's level 0.
        downsample: level-0 pixels per mask pixel when rasterising GeoJSON; default makes the
            longest side at most 4096.

    Returns:
        mask: bool (h, w).
        mask_downsample: (x, y) level-0 pixels per mask pixel.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file")
    if path.suffix.lower() in (".json", ".geojson"):
        geojson = read_geojson(path)
        if downsample is None:
            downsample = max(1.0, max(level0_size) / MASK_MAX_SIZE)
        mask = rasterize_geojson(geojson, level0_size, downsample, name=str(path))
        return mask, (downsample, downsample)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mask = np.asarray(img.convert("L")) > 0
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(
            f"{path}: cannot read as a mask image ({' '.join(str(exc).split())})"
        ) from None
    w0, h0 = level0_size
    return mask, (w0 / mask.shape[1], h0 / mask.shape[0])


def read_geojson(path: str | os.PathLike) -> Any:
    """Parse a GeoJSON file as plain JSON: NaN and Infinity (which Python's json would take)
    are refused, and so is nesting too deep to walk."""
    path = Path(path)

    def refuse(constant: str) -> NoReturn:
        raise ValueError(f"{constant} is not a JSON number")

    try:
        return json.loads(path.read_text(encoding="utf-8-sig"), parse_constant=refuse)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError too
        reason = " ".join(str(exc).split()) or "nested too deeply"
        raise InputError(f"{path}: cannot read as GeoJSON ({reason})") from None


GEOMETRIES = ("Polygon", "MultiPolygon", "GeometryCollection")  # what a mask is drawn from
IGNORED_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")  # no area
COORD_LIMIT = 1e9  # |level-0 coordinate| beyond which a polygon is no slide's (PIL draws int32)


def rasterize_geojson(
    geojson: Any,
    level0_size: tuple[int, int],
    downsample: float,
    *,
    name: str = "GeoJSON",
) -> np.ndarray:
    """Rasterise the polygons of a GeoJSON object (holes included) at a low resolution.

    Accepts a FeatureCollection, a Feature, a list of Features (QuPath's two export styles) or a
    bare geometry; Polygon and MultiPolygon count, points and lines are ignored. Anything else
    (another top level, an unknown geometry type, coordinates that are not finite numbers in
    rings of at least 3 (x, y) positions, an empty polygon) is an InputError naming `name` and
    the place in the document, e.g. ``features[2].geometry.coordinates[0]``.

    Args:
        geojson: the parsed JSON.
        level0_size: (width, height) of level 0; coordinates are level-0 pixels.
        downsample: level-0 pixels per mask pixel.
        name: used in error messages (the file).

    Returns:
        bool (ceil(height / downsample), ceil(width / downsample)).
    """
    from PIL import Image, ImageDraw

    document = _Document(name)
    document.top(geojson)
    if not document.polygons:
        ignored = sorted(document.ignored)
        found = f"only {', '.join(ignored)}" if ignored else "no geometry"
        raise InputError(f"{name}: no Polygon or MultiPolygon geometry found ({found})")
    width = max(1, math.ceil(level0_size[0] / downsample))
    height = max(1, math.ceil(level0_size[1] / downsample))
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for rings in document.polygons:
        for i, ring in enumerate(rings):  # the exterior, then its holes
            points = ring[:, :2] / downsample - 0.5
            draw.polygon([tuple(p) for p in points.tolist()], fill=0 if i else 1)
    return np.asarray(img) > 0


class _Document:
    """The polygons of a GeoJSON document, checked on the way down; errors name the file and
    the place, e.g. ``features[2].geometry.coordinates[0]``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.polygons: list[list[np.ndarray]] = []  # per polygon: rings (K, 2+), exterior first
        self.ignored: set[str] = set()  # geometry types without an area that were met

    def fail(self, where: str, expected: str, got: Any) -> InputError:
        at = f"{self.name}: {where}" if where else self.name
        got = got if isinstance(got, str) else _describe(got)
        return InputError(f"{at}: expected {expected}, got {got}")

    def top(self, obj: Any) -> None:
        kind = obj.get("type") if isinstance(obj, dict) else None
        if isinstance(obj, list):  # QuPath: a bare list of Features
            for i, item in enumerate(obj):
                self.feature(item, f"[{i}]")
        elif kind == "FeatureCollection":
            features = obj.get("features")
            if not isinstance(features, list):
                raise self.fail("features", "a list of Features", features)
            for i, item in enumerate(features):
                self.feature(item, f"features[{i}]")
        elif kind == "Feature":
            self.feature(obj, "")
        elif kind in GEOMETRIES + IGNORED_GEOMETRIES:
            self.geometry(obj, "")
        else:
            raise self.fail(
                "", "a GeoJSON FeatureCollection, Feature, list of Features or geometry", obj
            )

    def feature(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict) or obj.get("type") != "Feature":
            raise self.fail(where, "a Feature", obj)
        if obj.get("geometry") is not None:  # null: a Feature without a place (RFC 7946)
            self.geometry(obj["geometry"], _join(where, "geometry"))

    def geometry(self, obj: Any, where: str) -> None:
        kind = obj.get("type") if isinstance(obj, dict) else None
        coordinates = obj.get("coordinates") if isinstance(obj, dict) else None
        here = _join(where, "coordinates")
        if kind == "GeometryCollection":
            geometries = obj.get("geometries")
            if not isinstance(geometries, list):
                raise self.fail(_join(where, "geometries"), "a list of geometries", geometries)
            for i, item in enumerate(geometries):
                self.geometry(item, _join(where, f"geometries[{i}]"))
        elif kind == "Polygon":
            self.polygons.append(self.polygon(coordinates, here))
        elif kind == "MultiPolygon":
            if not isinstance(coordinates, list) or not coordinates:
                raise self.fail(here, "a non-empty list of polygons", coordinates)
            for i, rings in enumerate(coordinates):
                self.polygons.append(self.polygon(rings, f"{here}[{i}]"))
        elif kind in IGNORED_GEOMETRIES:
            self.ignored.add(kind)
        else:
            types = ", ".join(GEOMETRIES + IGNORED_GEOMETRIES)
            raise self.fail(where, f"a geometry of type {types}", obj)

    def polygon(self, rings: Any, where: str) -> list[np.ndarray]:
        if not isinstance(rings, list) or not rings:
            raise self.fail(where, "a non-empty list of rings (exterior, then holes)", rings)
        return [self.ring(ring, f"{where}[{i}]") for i, ring in enumerate(rings)]

    def ring(self, ring: Any, where: str) -> np.ndarray:
        expected = "a ring of at least 3 [x, y] positions in finite level-0 pixels"
        try:
            points = np.asarray(ring) if isinstance(ring, list) else None
        except ValueError:  # ragged nesting
            points = None
        if points is None or points.ndim != 2 or points.shape[1] < 2:
            raise self.fail(where, expected, ring)
        if points.dtype.kind not in "iuf":
            raise self.fail(where, expected, f"{points.dtype.name} values: {_short(ring)}")
        if len(points) < 3:
            raise self.fail(where, expected, f"{len(points)} position(s)")
        points = points.astype(np.float64)
        outside = ~(np.abs(points) <= COORD_LIMIT).all(axis=1)  # NaN, inf or too far
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise self.fail(
                where, f"{expected} within ±{COORD_LIMIT:g}", f"{points[first].tolist()} at {first}"
            )
        return points


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _describe(obj: Any) -> str:
    """A short picture of a JSON value for an error message."""
    if isinstance(obj, dict):
        kind = obj.get("type")
        return f"an object of type {kind!r}" if kind is not None else "an object without 'type'"
    if isinstance(obj, list):
        return "an empty list" if not obj else f"a list: {_short(obj)}"
    return "nothing" if obj is None else f"{type(obj).__name__} {_short(obj)}"


def _short(obj: Any) -> str:
    text = json.dumps(obj, default=str)
    return text if len(text) <= 40 else text[:37] + "..."
