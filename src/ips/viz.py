"""Pictures of what the model looked at: heatmaps, selection overlays, patch galleries, GeoJSON.

Numpy in, files out. K patches are given by their level-0 top-left corners ``coords`` (K, 2)
as (x, y) pixels, x to the right and y down, a square side ``patch_size`` in level-0 pixels,
and one attention score each, ``scores`` (K,).

Pictures need matplotlib (a dependency of ips); it is imported only by the functions that draw,
and only through ``Figure`` + the Agg canvas, so nothing touches pyplot's global state and
pictures can be drawn from several threads. GeoJSON needs nothing beyond the standard library.
Every file is written atomically: to a temporary file in the target folder, then renamed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from ips.errors import InputError, MissingExtraError
from ips.files import atomic_write

__all__ = [
    "SCALES",
    "heatmap_overlay",
    "patch_gallery",
    "patches_to_geojson",
    "scale_scores",
    "score_grid",
    "selection_overlay",
]

SCALES = ("linear", "rank", "log")  # the ways scores are mapped to colours
LOG_DECADES = 6  # "log" scale: scores below max / 10**6 are clipped to that floor

_DPI = 100  # figure pixels per inch; layouts below are computed in pixels
_MIN_SIDE = 512  # pictures smaller than this are enlarged by an integer factor
_MIN_TILE = 96  # gallery tiles smaller than this are enlarged by an integer factor
_OUTLINE = "#00e5ff"  # cyan: visible over inferno colours and over H&E stains
_CLASS_COLOUR = (255, 140, 0)  # QuPath class colour of exported patches
_LOW_COLOUR, _HIGH_COLOUR = (255, 225, 60), (210, 0, 0)  # per-patch colours, yellow -> red


# ---------------------------------------------------------------------------------------------
# numbers


def scale_scores(scores: np.ndarray, mode: str = "linear") -> np.ndarray:
    """Map attention scores to [0, 1] for colouring; the order of the scores is kept.

    Modes:
        ``"linear"``: min-max, (s - min) / (max - min).
        ``"rank"``: percentile rank, (rank - 1) / (K - 1); ties share their mean rank. Spreads a
        peaked distribution (one dominant patch, the rest near zero) over the whole range.
        ``"log"``: log10 of the score, clipped below at max / 10**LOG_DECADES, then min-max;
        for softmax-like scores spanning several orders of magnitude. Needs a positive maximum.

    When all scores are equal (also when K = 1) every mode returns all 1.0: each patch is as
    important as the most important one, and a lone selected patch is drawn hot, not cold.

    Args:
        scores: (K,) finite attention scores.
        mode: one of ``SCALES``.

    Returns:
        (K,) float64 values in [0, 1]; 0 for the lowest and 1 for the highest score (except
        under ``"rank"`` with ties at either end).
    """
    if mode not in SCALES:
        raise InputError(f"scale must be one of {SCALES}, got {mode!r}")
    values = _as_scores(scores, "scores")
    if values.size == 0:
        return values
    if mode == "log":
        top = values.max()
        if top <= 0:
            raise InputError(f"scale='log' needs a positive maximum score, got max {top:g}")
        values = np.log10(np.maximum(values, top * 10.0**-LOG_DECADES))
    low, high = values.min(), values.max()
    if high == low:
        return np.ones_like(values)
    if mode == "rank":
        return _percentile_ranks(values)
    return (values - low) / (high - low)


def _percentile_ranks(values: np.ndarray) -> np.ndarray:
    """(K,) -> (K,) mean 0-based rank of each value divided by K - 1 (needs K >= 2)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # 0-based rank of the first copy of each distinct value
    mean_rank = first + (counts - 1) / 2
    return mean_rank[inverse.reshape(-1)] / (values.size - 1)


def score_grid(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size: float,
    image_size: tuple[int, int],
    out_shape: tuple[int, int],
) -> np.ndarray:
    """Rasterise per-patch scores into a map at thumbnail resolution.

    A thumbnail pixel takes the score of every patch that overlaps it, the highest where
    patches overlap; each patch covers at least one pixel however small it is.

    Args:
        coords: (K, 2) level-0 (x, y) top-left corners.
        scores: (K,) values to paint, e.g. ``scale_scores(scores)``.
        patch_size: patch side in level-0 pixels.
        image_size: level-0 (width, height) of the whole image.
        out_shape: (h, w) of the thumbnail.

    Returns:
        (h, w) float64 map, NaN where no patch lies.
    """
    coords, scores = _check_patches(coords, scores)
    size = _positive(patch_size, "patch_size")
    width, height = _pair(image_size, "image_size", "(width, height)")
    out_h, out_w = _pair(out_shape, "out_shape", "(h, w)")
    cols = _pixel_spans(coords[:, 0], size, out_w / width, out_w)  # (K, 2) first, end column
    rows = _pixel_spans(coords[:, 1], size, out_h / height, out_h)  # (K, 2) first, end row
    grid = np.full((out_h, out_w), np.nan)
    for (c0, c1), (r0, r1), value in zip(cols, rows, scores, strict=True):
        if c1 > c0 and r1 > r0:  # patches wholly outside the image paint nothing
            block = grid[r0:r1, c0:c1]
            np.fmax(block, value, out=block)  # fmax ignores the NaN of empty pixels
    return grid


def _pixel_spans(start: np.ndarray, size: float, factor: float, limit: int) -> np.ndarray:
    """(K,) level-0 starts -> (K, 2) [first, end) thumbnail pixels touched, clipped to limit."""
    eps = 1e-6  # keeps 70.00000000000001 from reaching into pixel 70
    first = np.floor(start * factor + eps)
    end = np.maximum(np.ceil((start + size) * factor - eps), first + 1)
    return np.clip(np.stack([first, end], axis=1), 0, limit).astype(int)


# ---------------------------------------------------------------------------------------------
# pictures


def heatmap_overlay(
    thumbnail: np.ndarray,
    coords: np.ndarray,
    scores: np.ndarray,
    *,
    patch_size: float,
    image_size: tuple[int, int],
    out: str | os.PathLike,
    scale: str = "linear",
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str = "inferno",
    selected: np.ndarray | None = None,
) -> Path:
    """Draw the attention map over a thumbnail of the image, with a colour bar; write a PNG.

    Pixels under no patch show the plain thumbnail. The thumbnail is drawn at an integer
    enlargement (at least 1, and enough to make the longer side >= 512 pixels), so the picture
    is never smaller than the thumbnail and small patches stay visible.

    Args:
        thumbnail: (h, w) grey or (h, w, 3) RGB uint8 picture of the whole image.
        coords: (K, 2) level-0 (x, y) top-left corners.
        scores: (K,) attention scores.
        patch_size: patch side in level-0 pixels.
        image_size: level-0 (width, height) of the image the thumbnail shows.
        out: PNG path; missing folders are created.
        scale: how scores become colours, one of ``SCALES`` (see ``scale_scores``).
        title: line above the picture, e.g. the predicted label and its probability.
        alpha: opacity of the map over the thumbnail, in [0, 1].
        cmap: matplotlib colormap name.
        selected: patches to outline, a (K,) bool mask or indices into ``coords``.

    Returns:
        The path written.
    """
    rgb = _as_rgb(thumbnail, "thumbnail")
    coords, scores = _check_patches(coords, scores)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    outlined = None if selected is None else _selection_mask(selected, len(scores))
    height, width = rgb.shape[:2]
    grid = score_grid(coords, scale_scores(scores, scale), patch_size, image_size, rgb.shape[:2])
    mpl = _matplotlib()
    colormap = _colormap(mpl, cmap)

    page = _Page(height, width, title=title, colorbar=True, legend=outlined is not None)
    fig = page.figure(mpl)
    ax = page.image_axes(fig)
    extent = (0, width, height, 0)  # data units = thumbnail pixels
    ax.imshow(rgb, extent=extent, interpolation="nearest")
    ax.imshow(
        np.ma.masked_invalid(grid),
        extent=extent,
        interpolation="nearest",
        cmap=colormap,
        vmin=0.0,
        vmax=1.0,
        alpha=alpha,
    )
    if outlined is not None:
        level0_w, level0_h = _pair(image_size, "image_size", "(width, height)")
        sx, sy = width / level0_w, height / level0_h  # thumbnail pixels per level-0 pixel
        side = (float(patch_size) * sx, float(patch_size) * sy)
        lines = _outline_width(min(side) * page.zoom)
        boxes = [mpl.Rectangle((x * sx, y * sy), *side) for x, y in coords[outlined]]
        ax.add_collection(
            mpl.PatchCollection(boxes, facecolor="none", edgecolor=_OUTLINE, linewidths=lines)
        )
        handle = mpl.Rectangle((0, 0), 1, 1, facecolor="none", edgecolor=_OUTLINE, linewidth=1.5)
        page.legend(fig, handle, f"selected patches ({int(outlined.sum())})")
    page.colorbar(fig, mpl, colormap, scores, scale)
    page.title(fig)
    return _save_png(fig, out)


def selection_overlay(
    image: np.ndarray,
    coords: np.ndarray,
    scores: np.ndarray,
    *,
    patch_size: float,
    out: str | os.PathLike,
    downsample: float = 1.0,
    title: str | None = None,
    top_labels: int = 10,
    scale: str = "linear",
    cmap: str = "plasma",
) -> Path:
    """Draw each patch as a box over the image, coloured and filled by its score; write a PNG.

    Higher scores give a brighter colour, a more opaque fill and a place on top of lower ones;
    the ``top_labels`` best boxes are tagged with their rank and score.

    Args:
        image: (h, w) grey or (h, w, 3) RGB uint8; the whole image at ``downsample``.
        coords: (K, 2) level-0 (x, y) top-left corners.
        scores: (K,) attention scores.
        patch_size: patch side in level-0 pixels.
        out: PNG path; missing folders are created.
        downsample: level-0 pixels per image pixel (1 for the full-resolution image).
        title: line above the picture.
        top_labels: how many of the best patches get a "#rank score" tag (0 for none).
        scale: how scores become colours, one of ``SCALES`` (see ``scale_scores``).
        cmap: matplotlib colormap name.

    Returns:
        The path written.
    """
    rgb = _as_rgb(image, "image")
    coords, scores = _check_patches(coords, scores)
    size = _positive(patch_size, "patch_size")
    factor = _positive(downsample, "downsample")
    if top_labels < 0:
        raise InputError(f"top_labels must be >= 0, got {top_labels}")
    values = scale_scores(scores, scale)
    height, width = rgb.shape[:2]
    mpl = _matplotlib()
    colormap = _colormap(mpl, cmap)

    page = _Page(height, width, title=title, colorbar=True, legend=False)
    fig = page.figure(mpl)
    ax = page.image_axes(fig)
    ax.imshow(rgb, extent=(0, width * factor, height * factor, 0), interpolation="nearest")
    order = np.argsort(values, kind="stable")  # drawn low to high: the best end up on top
    ranked = values[order]  # (K,) in [0, 1]
    colours = colormap(ranked)  # (K, 4) RGBA
    fills = np.concatenate([colours[:, :3], 0.05 + 0.25 * ranked[:, None]], axis=1)
    edges = np.concatenate([colours[:, :3], 0.6 + 0.4 * ranked[:, None]], axis=1)
    widest = _outline_width(size * page.zoom / factor)  # points, for the best patch
    boxes = mpl.PatchCollection(
        [mpl.Rectangle((x, y), size, size) for x, y in coords[order]],
        facecolors=fills,
        edgecolors=edges,
        linewidths=widest * (0.5 + 0.5 * ranked),
    )
    # a pale halo under each outline keeps dark colours visible on dark images
    boxes.set_path_effects([mpl.withStroke(linewidth=widest + 1.5, foreground=(1, 1, 1, 0.6))])
    ax.add_collection(boxes)
    best = np.argsort(-scores, kind="stable")[:top_labels]
    tags = [(coords[i], size, f"#{rank} {_fmt(scores[i])}") for rank, i in enumerate(best, 1)]
    _place_tags(fig, ax, tags, fontsize=8 * page.unit)
    page.colorbar(fig, mpl, colormap, scores, scale)
    page.title(fig)
    return _save_png(fig, out)


def patch_gallery(
    patches: np.ndarray,
    scores: np.ndarray,
    *,
    out: str | os.PathLike,
    ncols: int = 8,
    title: str | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Lay out patches best first, each captioned with its rank and score; write a PNG.

    Patches are shown at an integer enlargement (at least 1 picture pixel per patch pixel, more
    for patches under 96 pixels) without smoothing, framed by a thin grey line.

    Args:
        patches: (k, C, P, P) with C = 1 or 3, or (k, P, P) grey, uint8.
        scores: (k,) attention scores.
        out: PNG path; missing folders are created.
        ncols: patches per row.
        title: line above the gallery.
        labels: k strings shown under each score (e.g. a level-0 position or a class).

    Returns:
        The path written.
    """
    tiles = _as_tiles(patches)  # (k, P, P, 3)
    count, tile_h, tile_w = tiles.shape[:3]
    scores = _as_scores(scores, "scores")
    if scores.shape != (count,):
        raise InputError(f"scores must be (k,) = ({count},) to match patches, got {scores.shape}")
    if labels is not None and len(labels) != count:
        raise InputError(f"labels must hold k = {count} strings, got {len(labels)}")
    if ncols < 1:
        raise InputError(f"ncols must be >= 1, got {ncols}")
    mpl = _matplotlib()

    zoom = max(1, math.ceil(_MIN_TILE / max(tile_h, tile_w)))
    shown_h, shown_w = tile_h * zoom, tile_w * zoom
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    font = 9.0  # points
    line = round(1.35 * font * _DPI / 72)  # pixels per caption line
    caption = line * (2 if labels is not None else 1) + 4
    cell_w = max(shown_w, 84)  # room for "#100 0.0123"
    pad, gap = 12, 14
    title_h = round(2.2 * 11 * _DPI / 72) if title else 0
    width = 2 * pad + ncols * cell_w + (ncols - 1) * gap
    height = 2 * pad + title_h + nrows * (caption + shown_h) + (nrows - 1) * gap

    mosaic = np.full((height, width, 3), 255, dtype=np.uint8)
    order = np.argsort(-scores, kind="stable")
    spots = []  # (left, top) of each caption
    for slot, i in enumerate(order):
        row, col = divmod(slot, ncols)
        left = pad + col * (cell_w + gap)
        top = pad + title_h + row * (caption + shown_h + gap)
        y0, x0 = top + caption, left
        mosaic[y0 - 1 : y0 + shown_h + 1, x0 - 1 : x0 + shown_w + 1] = 190  # 1-pixel frame
        mosaic[y0 : y0 + shown_h, x0 : x0 + shown_w] = tiles[i].repeat(zoom, 0).repeat(zoom, 1)
        spots.append((left, top))

    fig = _figure(mpl, width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_axis_off()
    max_chars = max(4, int(cell_w / (0.62 * font * _DPI / 72)))
    for rank, (i, (left, top)) in enumerate(zip(order, spots, strict=True), start=1):
        ax.text(
            left,
            top + line,
            f"#{rank}  {_fmt(scores[i])}",
            fontsize=font,
            fontweight="bold",
            va="bottom",
            ha="left",
        )
        if labels is not None:
            ax.text(
                left,
                top + 2 * line,
                _shorten(str(labels[i]), max_chars),
                fontsize=font,
                color="0.3",
                va="bottom",
                ha="left",
            )
    if title:
        ax.text(width / 2, pad, title, fontsize=11, ha="center", va="top")
    return _save_png(fig, out)


# ---------------------------------------------------------------------------------------------
# GeoJSON


def patches_to_geojson(
    coords: np.ndarray,
    scores: np.ndarray,
    *,
    patch_size: float,
    out: str | os.PathLike,
    properties: dict | None = None,
    name: str = "ips selection",
) -> Path:
    """Write the patches as a GeoJSON FeatureCollection that QuPath imports as annotations.

    One Polygon per patch, best first, in level-0 pixel coordinates (x to the right, y down,
    origin at the top-left corner of the full-resolution image, as QuPath uses), ring
    [[x, y], [x+s, y], [x+s, y+s], [x, y+s], [x, y]]. Properties of each feature:

    - ``objectType``: ``"annotation"``; ``classification``: ``{"name": name, "color": [r, g, b]}``
      (one class for all patches, so they can be shown, hidden or selected together);
    - ``name``: ``"#rank score"``, the label QuPath lists; ``color``: [r, g, b] from yellow
      (lowest score) to red (highest), the colour QuPath draws the patch with;
    - ``measurements``: ``{"attention score": s, "attention rank": r}``, shown in QuPath's
      measurement tables (QuPath >= 0.4 reads this dict form);
    - ``score`` (float) and ``rank`` (int, 1 = best) for other readers;
    - then ``properties``, copied into every feature; its keys replace the ones above.

    Args:
        coords: (K, 2) level-0 (x, y) top-left corners.
        scores: (K,) attention scores.
        patch_size: patch side in level-0 pixels.
        out: path of the .geojson file; missing folders are created.
        properties: extra JSON-serialisable properties for every feature (numpy scalars and
            arrays are converted; NaN is refused).
        name: QuPath class name of the patches.

    Returns:
        The path written.
    """
    coords, scores = _check_patches(coords, scores)
    size = _positive(patch_size, "patch_size")
    colours = _ramp(scale_scores(scores, "linear"))  # (K, 3) ints
    features = []
    for rank, i in enumerate(np.argsort(-scores, kind="stable"), start=1):
        x, y = float(coords[i, 0]), float(coords[i, 1])
        score = float(scores[i])
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        props: dict[str, Any] = {
            "objectType": "annotation",
            "name": f"#{rank} {_fmt(score)}",
            "color": colours[i].tolist(),
            "classification": {"name": name, "color": list(_CLASS_COLOUR)},
            "measurements": {"attention score": score, "attention rank": float(rank)},
            "score": score,
            "rank": rank,
            **(properties or {}),
        }
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
        )
    collection = {"type": "FeatureCollection", "features": features}
    text = json.dumps(collection, allow_nan=False, default=_json_default)
    return _write_atomic(out, lambda fh: fh.write(text.encode("utf-8")))


def _ramp(values: np.ndarray) -> np.ndarray:
    """(K,) values in [0, 1] -> (K, 3) uint8 colours from _LOW_COLOUR to _HIGH_COLOUR."""
    low, high = np.array(_LOW_COLOUR, float), np.array(_HIGH_COLOUR, float)
    return np.rint(low + values[:, None] * (high - low)).astype(np.uint8)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"properties must be JSON-serialisable, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# page layout (all sizes in figure pixels)


class _Page:
    """Pixel layout of a picture with a title, an image, a colour bar and a legend line.

    The image is enlarged by an integer ``zoom`` so its longer side reaches _MIN_SIDE pixels;
    text and margins grow by ``unit`` with pictures larger than 800 pixels, so they stay
    readable when the whole picture is fitted to a screen.
    """

    def __init__(
        self, height: int, width: int, *, title: str | None, colorbar: bool, legend: bool
    ) -> None:
        self.zoom = max(1, math.ceil(_MIN_SIDE / max(height, width)))
        self.shown_h, self.shown_w = height * self.zoom, width * self.zoom
        self.unit = max(1.0, max(self.shown_h, self.shown_w) / 800)
        u = self.unit
        self.title_text = title
        self.pad = round(12 * u)
        self.title_h = round(34 * u) if title else 0
        self.legend_h = round(26 * u) if legend else 0
        self.bar_gap, self.bar_w = round(14 * u), round(18 * u)
        self.bar_room = round(95 * u) if colorbar else 0  # tick labels and axis label
        bar = self.bar_gap + self.bar_w + self.bar_room if colorbar else 0
        self.width = self.pad + self.shown_w + bar + self.pad
        self.height = self.pad + self.title_h + self.shown_h + self.legend_h + self.pad
        self.bottom = self.pad + self.legend_h  # of the image, from the figure's bottom

    def figure(self, mpl: _Mpl) -> Any:
        return _figure(mpl, self.width, self.height)

    def _box(self, left: float, bottom: float, width: float, height: float) -> tuple:
        return (left / self.width, bottom / self.height, width / self.width, height / self.height)

    def image_axes(self, fig: Any) -> Any:
        ax = fig.add_axes(self._box(self.pad, self.bottom, self.shown_w, self.shown_h))
        ax.set_axis_off()
        return ax

    def colorbar(self, fig: Any, mpl: _Mpl, colormap: Any, scores: np.ndarray, scale: str):
        left = self.pad + self.shown_w + self.bar_gap
        cax = fig.add_axes(self._box(left, self.bottom, self.bar_w, self.shown_h))
        mappable = mpl.ScalarMappable(norm=mpl.Normalize(0.0, 1.0), cmap=colormap)
        bar = fig.colorbar(mappable, cax=cax)
        positions, labels, label = _colorbar_ticks(scores, scale)
        bar.set_ticks(positions, labels=labels)
        bar.ax.tick_params(labelsize=9 * self.unit, width=self.unit, length=4 * self.unit)
        bar.outline.set_linewidth(0.8 * self.unit)
        bar.set_label(label, fontsize=10 * self.unit)

    def legend(self, fig: Any, handle: Any, text: str) -> None:
        fig.legend(
            [handle],
            [text],
            loc="lower left",
            bbox_to_anchor=(self.pad / self.width, self.pad / 3 / self.height),
            frameon=False,
            fontsize=9 * self.unit,
            borderaxespad=0,
            handlelength=1.2,
        )

    def title(self, fig: Any) -> None:
        if self.title_text:
            centre = (self.pad + self.shown_w / 2) / self.width
            top = 1 - self.pad / 2 / self.height
            fig.text(centre, top, self.title_text, ha="center", va="top", fontsize=12 * self.unit)


def _colorbar_ticks(scores: np.ndarray, scale: str) -> tuple[list[float], list[str], str]:
    """Colour-bar tick positions in [0, 1], their labels in score units, and the axis label."""
    label = {
        "linear": "attention score (linear scale)",
        "log": "attention score (log scale)",
        "rank": "attention score (rank scale, percentile)",
    }[scale]
    if scores.size == 0:
        return [], [], label
    low, high = float(scores.min()), float(scores.max())
    if low == high:
        return [1.0], [_fmt(high)], label
    positions = np.linspace(0.0, 1.0, 5)
    if scale == "rank":
        return positions.tolist(), [f"{100 * t:.0f}%" for t in positions], label
    if scale == "log":
        lo, hi = math.log10(max(low, high * 10.0**-LOG_DECADES)), math.log10(high)
        decades = np.arange(math.ceil(lo), math.floor(hi) + 1)
        if len(decades) >= 2:  # ticks at whole powers of ten, as on a log axis
            return ((decades - lo) / (hi - lo)).tolist(), [f"{10.0**d:g}" for d in decades], label
        raw = 10.0 ** (lo + positions * (hi - lo))
    else:
        raw = low + positions * (high - low)
    return positions.tolist(), [_fmt(v) for v in raw], label


def _place_tags(fig: Any, ax: Any, tags: list, fontsize: float) -> None:
    """Write short tags next to their boxes, keeping tags off each other and off the boxes.

    Tags are placed in the order given (best first), each at the first free spot among: above,
    below, right of and left of its box, then the same spots further out with a leader line;
    a tag that finds no free spot inside the picture goes above its box.

    Args:
        tags: (corner (x, y), side, text) per box, in data units.
    """
    renderer = fig.canvas.get_renderer()
    to_pixels, to_data = ax.transData, ax.transData.inverted()
    frame = ax.get_window_extent(renderer)
    boxes = []  # pixel (x0, y0, x1, y1) of each tagged box, y up
    for (x, y), side, _ in tags:
        (x0, y1), (x1, y0) = to_pixels.transform([(x, y), (x + side, y + side)])
        boxes.append((x0, y0, x1, y1))
    taken = list(boxes)  # rectangles a new tag must not overlap
    style = {
        "boxstyle": "square,pad=0.15",
        "facecolor": "white",
        "edgecolor": "none",
        "alpha": 0.85,
    }
    for ((x, y), side, text), (bx0, by0, bx1, by1) in zip(tags, boxes, strict=True):
        tag = ax.text(
            0,
            0,
            text,
            fontsize=fontsize,
            ha="left",
            va="bottom",
            bbox=style,
            clip_on=True,
            zorder=5,
        )
        extent = tag.get_window_extent(renderer)
        tw, th = extent.width + 2, extent.height + 2
        middle = (by0 + by1 - th) / 2
        chosen, far = (bx0, by1 + 2), False
        for step in range(5):
            gap = 2 + step * 1.5 * th
            spots = [
                (bx0, by1 + gap),
                (bx0, by0 - gap - th),
                (bx1 + gap, middle),
                (bx0 - gap - tw, middle),
            ]  # above, below, right, left
            free = [
                (sx, sy)
                for sx, sy in spots
                if _inside(sx, sy, tw, th, frame)
                and not any(_overlap(sx, sy, tw, th, box) for box in taken)
            ]
            if free:
                chosen, far = free[0], step > 0
                break
        sx, sy = chosen
        tag.set_position(to_data.transform((sx, sy)))
        taken.append((sx, sy, sx + tw, sy + th))
        if far:  # away from its box: a leader line from the tag to the box centre
            ax.annotate(
                "",
                xy=(x + side / 2, y + side / 2),
                xytext=to_data.transform((sx + tw / 2, sy + th / 2)),
                arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.6},
                zorder=4,
                annotation_clip=False,
            )


def _inside(x: float, y: float, w: float, h: float, frame: Any) -> bool:
    return frame.x0 <= x and x + w <= frame.x1 and frame.y0 <= y and y + h <= frame.y1


def _overlap(x: float, y: float, w: float, h: float, box: tuple) -> bool:
    x0, y0, x1, y1 = box
    return x < x1 and x0 < x + w and y < y1 and y0 < y + h


def _outline_width(side_px: float) -> float:
    """Line width in points for a box of side_px picture pixels: thin for small boxes."""
    return float(np.clip(side_px / 12, 0.5, 2.0))


# ---------------------------------------------------------------------------------------------
# checks and helpers


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise InputError(f"{name} must be (K,), got {values.shape}")
    if not np.isfinite(values).all():
        raise InputError(f"{name} must be finite, got {int((~np.isfinite(values)).sum())} NaN/inf")
    return values


def _check_patches(coords: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate coords (K, 2) and scores (K,); return both as float64."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(f"coords must be (K, 2) level-0 (x, y) corners, got {coords.shape}")
    if not np.isfinite(coords).all():
        raise InputError("coords must be finite")
    values = _as_scores(scores, "scores")
    if values.shape != (len(coords),):
        raise InputError(
            f"scores must be (K,) = ({len(coords)},) to match coords, got {values.shape}"
        )
    return coords, values


def _selection_mask(selected: np.ndarray, count: int) -> np.ndarray:
    """(K,) bool mask or (n,) indices -> (K,) bool mask."""
    selected = np.asarray(selected)
    if selected.dtype == bool:
        if selected.shape != (count,):
            raise InputError(f"selected must be a (K,) = ({count},) mask, got {selected.shape}")
        return selected
    if selected.size == 0:
        return np.zeros(count, dtype=bool)
    if selected.ndim != 1 or not np.issubdtype(selected.dtype, np.integer):
        raise InputError(
            f"selected must be a (K,) bool mask or (n,) integer indices, got "
            f"{selected.dtype} {selected.shape}"
        )
    ids = selected.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= count):
        raise InputError(f"selected indices must lie in [0, {count}), got {ids.min()}..{ids.max()}")
    mask = np.zeros(count, dtype=bool)
    mask[ids] = True
    return mask


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """(h, w) grey or (h, w, 3) RGB uint8 -> (h, w, 3) uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(f"{name} must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name} must be (h, w) grey or (h, w, 3) RGB, got {image.shape}")
    return image


def _as_tiles(patches: np.ndarray) -> np.ndarray:
    """(k, C, P, P) with C = 1 or 3, or (k, P, P), uint8 -> (k, P, P, 3) uint8."""
    patches = np.asarray(patches)
    if patches.dtype != np.uint8:
        raise InputError(f"patches must be uint8, got {patches.dtype}")
    if patches.ndim == 3:
        patches = patches[:, None]
    if patches.ndim != 4 or patches.shape[1] not in (1, 3) or 0 in patches.shape:
        raise InputError(
            f"patches must be (k, C, P, P) with C = 1 or 3, or (k, P, P), got {patches.shape}"
        )
    tiles = patches.transpose(0, 2, 3, 1)
    return np.repeat(tiles, 3, axis=3) if tiles.shape[3] == 1 else tiles


def _positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} must be a positive number, got {value}")
    return value


def _pair(value: tuple[int, int], name: str, meaning: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise InputError(f"{name} must be two positive integers {meaning}, got {tuple(value)}")
    return pair


def _fmt(score: float) -> str:
    return f"{float(score):.3g}"


def _shorten(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


class _Mpl:
    """The few matplotlib names used here, imported on first use."""

    def __init__(self) -> None:
        try:
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.cm import ScalarMappable
            from matplotlib.collections import PatchCollection
            from matplotlib.colors import Normalize
            from matplotlib.figure import Figure
            from matplotlib.patches import Rectangle
            from matplotlib.patheffects import withStroke
        except ImportError as err:
            raise MissingExtraError(
                "pictures need matplotlib, a dependency of ips: pip install matplotlib"
            ) from err
        self.colormaps = matplotlib.colormaps
        self.FigureCanvasAgg = FigureCanvasAgg
        self.ScalarMappable = ScalarMappable
        self.PatchCollection = PatchCollection
        self.Normalize = Normalize
        self.Figure = Figure
        self.Rectangle = Rectangle
        self.withStroke = withStroke


def _matplotlib() -> _Mpl:
    return _Mpl()


def _colormap(mpl: _Mpl, name: str) -> Any:
    try:
        return mpl.colormaps[name]
    except KeyError:
        raise InputError(f"cmap must be a matplotlib colormap name, got {name!r}") from None


def _figure(mpl: _Mpl, width_px: int, height_px: int) -> Any:
    """A white figure of exactly width_px x height_px pixels on its own Agg canvas."""
    fig = mpl.Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI, facecolor="white")
    mpl.FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, out: str | os.PathLike) -> Path:
    return _write_atomic(out, lambda fh: fig.savefig(fh, format="png", dpi=_DPI))


def _write_atomic(out: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call write(file) on a temporary file next to out, then rename it to out."""
    path = Path(out)
    with atomic_write(path) as fh:
        write(fh)
    return path
