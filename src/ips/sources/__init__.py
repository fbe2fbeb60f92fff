"""Lazy pixel access: patch grids over arrays, large TIFFs, whole-slide images and photos.

Every source follows the `PatchSource` protocol: `len(source)` patches of side P in raster
order, `source.read(ids) -> uint8 (n, C, P, P)`, level-0 `coords`, grid `positions`, a
`thumbnail` for heatmaps. `open_source(path, patch_size=...)` picks the reader by suffix.
"""

from .arrays import ArraySource
from .base import (
    CannotReadError,
    PatchSource,
    Resolution,
    choose_resolution,
    open_source,
)
from .pil import PillowSource
from .slide import OpenSlideSource
from .synthetic import SyntheticSlide, write_synthetic_slide
from .tiff import TiffSource
from .tissue import (
    EmptyTissueError,
    load_tissue_mask,
    otsu_tissue_mask,
    rasterize_geojson,
    tissue_patch_ids,
    tissue_signal,
)

__all__ = [
    "ArraySource",
    "CannotReadError",
    "EmptyTissueError",
    "OpenSlideSource",
    "PatchSource",
    "PillowSource",
    "Resolution",
    "SyntheticSlide",
    "TiffSource",
    "choose_resolution",
    "load_tissue_mask",
    "open_source",
    "otsu_tissue_mask",
    "rasterize_geojson",
    "tissue_patch_ids",
    "tissue_signal",
    "write_synthetic_slide",
]
