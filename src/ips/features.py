"""Feature extraction: one HDF5 feature bag per slide, for training on precomputed features.

``extract_features(["slides/"], "features/", encoder="resnet50_4blocks", weights="imagenet")``
opens each slide (tissue detection, tiles of P pixels at the chosen level or mpp), encodes
every tissue tile in batches and writes ``features/<slide stem>.h5``::

    features (N, F) float32      the encoder's output per tile (contiguous: rows read fast)
    coords (N, 2) int64          level-0 (x, y) of each tile's top-left corner, raster order
    attributes                   patch_size (P), downsample (level-0 pixels per read pixel),
                                 level, mpp (level-0 microns per pixel, NaN when unknown),
                                 tile_mpp, encoder, weights, feature_dim, tissue, min_tissue,
                                 normalize_mean/std, slide, level0_width/height, ips_version,
                                 extraction (the settings as JSON, checked on resume)

Every bag is written to a temporary file in the same folder and renamed when complete, so a
bag that exists is whole. Re-running skips slides whose bag exists (after checking it was made
with the same settings). A slide that fails (unreadable, no tissue, NaN features) is reported
and skipped; the others go on. The summary, ``extraction_summary.json`` in the output folder,
is rewritten after every slide: settings, and per slide what happened.

Several processes: under ``torchrun --nproc-per-node K`` (``RANK`` and ``WORLD_SIZE`` set) or
with ``rank=`` / ``world_size=``, process r takes the slides r, r + K, r + 2K, ... of the sorted
list; no process group is needed. Each process writes its own summary,
``extraction_summary.rank<r>.json``.

Encoders: a registered pixel encoder (``ips.encoders``; ResNet trunks give their own width:
128, 512 or 2048), or ``timm:<name>`` for any timm model (``pip install
'iterative-patch-selection[timm]'``). Weights: None (untrained, seeded), ``"imagenet"`` (the
library's pretrained weights, downloaded once), or a local state-dict file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ips import distributed
from ips import progress as bars
from ips.config import GridConfig
from ips.data.camelyon16 import is_camelyon16, slide_files
from ips.data.feature_bags import import_h5py, tile_size_level0
from ips.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    TIMM_PREFIX,
    create_encoder,
    list_encoders,
    weights_normalization,
)
from ips.errors import InputError, MissingFileError, WriteError
from ips.files import atomic_write, sha256_of
from ips.precision import autocast, resolve_amp
from ips.sources import PatchSource, open_source
from ips.sources.base import OPENSLIDE_SUFFIXES, PILLOW_SUFFIXES, TIFF_SUFFIXES

log = logging.getLogger(__name__)

SLIDE_SUFFIXES = TIFF_SUFFIXES | OPENSLIDE_SUFFIXES | PILLOW_SUFFIXES  # found in folders
PUBLISHED = ("hub", "imagenet")  # --weights: the encoder's published weights
AMP = ("none", "bf16", "fp16")
SUMMARY = "extraction_summary.json"


EXTRACTION_GRID = GridConfig(tissue="otsu")  # tiles of tissue at level 0


@dataclass(frozen=True)
class ExtractionSettings:
    """What decides the features of a slide; stored in every bag and checked on resume."""

    encoder: str = "resnet50_4blocks"  # a registered pixel encoder, or "timm:<model name>"
    weights: str | None = None  # None: untrained; "imagenet": pretrained; else a state-dict path
    patch_size: int = 256  # P: tile side in pixels at the read resolution
    grid: GridConfig = EXTRACTION_GRID  # stride, resolution, tissue filter ("none" or "otsu")
    amp: str = "none"  # "none", "bf16" or "fp16" (CUDA) autocast for the encoder
    seed: int = 0  # initialises an untrained encoder
    weights_sha256: str | None = None  # digest of a weights file (None: no file)
    coords_from: str | None = None  # a folder of bags whose tile coordinates are reused

    def __post_init__(self) -> None:
        if int(self.patch_size) != self.patch_size or self.patch_size < 1:
            raise InputError(f"patch_size must be a positive integer, got {self.patch_size!r}")
        if self.grid.tissue == "mask":
            raise InputError("tissue must be 'otsu' or 'none' for extraction, got 'mask'")
        if self.amp not in AMP:
            raise InputError(f"amp must be one of {AMP} (auto resolved), got {self.amp!r}")

    def to_json(self) -> str:
        """The settings that change the features, as sorted JSON (the seed only matters for
        an untrained encoder). Grid fields at the defaults bags have always had (no stride,
        no downsample; level 0 unless another resolution is asked for) keep their old form,
        so bags written before stay comparable."""
        grid = self.grid
        values: dict[str, Any] = {
            "encoder": self.encoder,
            "weights": self.weights,
            "patch_size": self.patch_size,
            "amp": self.amp,
            "seed": self.seed,
            "level": grid.level,
            "target_mpp": grid.target_mpp,
            "mpp": grid.mpp,
            "tissue": None if grid.tissue == "none" else grid.tissue,
            "min_tissue": grid.min_tissue,
        }
        if grid.level is None and grid.target_mpp is None and grid.downsample is None:
            values["level"] = 0  # the same settings as level=0 given
        for key in ("stride", "downsample"):
            if getattr(grid, key) is not None:
                values[key] = getattr(grid, key)
        for key in ("weights_sha256", "coords_from"):
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        if self.weights is not None:
            values.pop("seed")
        return json.dumps(values, sort_keys=True)


def same_settings(found: str | None, wanted: str) -> bool:
    """Whether a bag's recorded settings are ``wanted``; a bag from before weight digests were
    recorded matches on the rest."""
    if found == wanted:
        return True
    try:
        old, new = json.loads(found or "null"), json.loads(wanted)
    except json.JSONDecodeError:
        return False
    if not isinstance(old, dict) or "weights_sha256" in old:
        return False
    new.pop("weights_sha256", None)
    return old == new


# ---- slides -----------------------------------------------------------------------------------


def find_slides(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Slide files from files, folders and slide lists.

    A folder gives its slide files (not recursive; a CAMELYON16 folder gives the slides of
    training/normal, training/tumor and testing/images); a ``.txt`` file lists one slide path
    per line (relative to the list; ``#`` starts a comment).

    Returns:
        The slides, sorted, each once.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            if is_camelyon16(path):
                found.extend(slide_files(path))
            else:
                found.extend(
                    p
                    for p in sorted(path.iterdir())
                    if p.is_file()
                    and not p.name.startswith(".")
                    and p.suffix.lower() in SLIDE_SUFFIXES
                )
        elif path.suffix.lower() == ".txt":
            if not path.is_file():
                raise MissingFileError(f"{path}: no such slide list")
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    listed = Path(line).expanduser()
                    found.append(listed if listed.is_absolute() else path.parent / listed)
        elif path.exists():
            found.append(path)
        else:
            raise MissingFileError(f"{path}: no such slide, folder or slide list")
    slides = sorted(dict.fromkeys(p.resolve() for p in found))
    if not slides:
        raise InputError(f"no slides found in {', '.join(str(p) for p in inputs)}")
    stems: dict[str, Path] = {}
    for slide in slides:
        if slide.stem in stems:
            raise InputError(
                f"two slides are called {slide.stem} ({stems[slide.stem]} and {slide}); "
                "their bags would share one file name"
            )
        stems[slide.stem] = slide
    return slides


# ---- the encoder ------------------------------------------------------------------------------


class Extractor(nn.Module):
    """uint8 tiles (n, C, P, P) -> float32 features (n, F): scale to [0, 1], normalise, encode.

    Attributes:
        feature_dim: F.
        mean, std: the per-channel normalisation (on [0, 1] pixels).
    """

    def __init__(self, encoder: nn.Module, *, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.encoder = encoder
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)
        self.feature_dim = 0
        self.embedding = "global average pool"  # how the encoder's output becomes a vector

    def forward(self, tiles: Tensor) -> Tensor:
        x = tiles.float().div_(255.0)
        x = ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)
        features = self.encoder(x)
        if features.dim() != 2:
            raise InputError(
                f"the encoder must return (n, F) features, got {tuple(features.shape)}"
            )
        return features.float()


def build_extractor(
    encoder: str, weights: str | None = None, *, patch_size: int = 256, seed: int = 0
) -> Extractor:
    """The encoder of `encoder`'s name with `weights`, in eval mode, F measured on one tile.

    Args:
        encoder: a registered pixel encoder (a ResNet trunk, a foundation-model preset such as
            ``uni``) or ``"timm:<model name>"``.
        weights: None (untrained, initialised from `seed`), "hub" or "imagenet" (the published
            weights: torchvision's for the ResNets, the Hugging Face hub for presets and timm
            models), or a weight file (loaded strictly).
        patch_size: P, for measuring F.
        seed: initialises an untrained encoder.
    """
    if weights not in (None, *PUBLISHED) and not Path(weights).expanduser().is_file():
        raise MissingFileError(f"weights: {weights}: no such file")
    pixel = [n for n in list_encoders() if n != "features"]
    if not encoder.startswith(TIMM_PREFIX) and encoder not in pixel:
        raise InputError(
            f"encoder: {encoder!r} is not a pixel encoder; expected one of {pixel} "
            f"or '{TIMM_PREFIX}<model name>'"
        )
    torch.manual_seed(seed)
    pretrained: bool | str = True if weights in PUBLISHED else (weights or False)
    module = create_encoder(encoder, in_channels=3, embed_dim=512, pretrained=pretrained)
    if hasattr(module, "proj"):  # the trunk's own width
        module.proj = nn.Identity()
    mean, std = weights_normalization(encoder, pretrained=True, in_channels=3) or (
        IMAGENET_MEAN,
        IMAGENET_STD,
    )
    extractor = Extractor(module, mean=mean, std=std).eval()
    preset = getattr(module, "preset", None)  # a timm model: how its embedding is read out
    extractor.embedding = preset.embedding if preset is not None else "global average pool"
    with torch.inference_mode():
        probe = extractor(torch.zeros(1, 3, patch_size, patch_size, dtype=torch.uint8))
    extractor.feature_dim = int(probe.shape[1])
    return extractor


# ---- one slide --------------------------------------------------------------------------------


class TileBatches(Dataset):
    """Item k: uint8 (n, 3, P, P), the tiles [k * size, (k + 1) * size) of one slide."""

    def __init__(self, source: PatchSource, size: int) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return math.ceil(len(self.source) / self.size)

    def __getitem__(self, k: int) -> Tensor:
        ids = np.arange(k * self.size, min((k + 1) * self.size, len(self.source)))
        tiles = self.source.read(ids)  # (n, C, P, P)
        if tiles.shape[1] == 1:  # grey: the encoders read RGB
            tiles = np.repeat(tiles, 3, axis=1)
        return torch.from_numpy(tiles)


def extract_slide(
    slide: str | os.PathLike,
    bag: str | os.PathLike,
    extractor: Extractor,
    settings: ExtractionSettings,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, str], Any] | None = None,
) -> int:
    """Encode the tissue tiles of one slide and write its bag atomically.

    Args:
        slide: the slide file.
        bag: the ``.h5`` file to write.
        extractor: from `build_extractor`, already on `device`.
        settings: how to tile (and what to record).
        batch_size: tiles per encoder call.
        num_workers: DataLoader processes reading tiles (each opens the slide itself).
        device: where the extractor runs.
        progress: ``progress(total, name)`` returning a bar with ``update(n)`` and ``close()``.

    Returns:
        N, the number of tiles encoded.
    """
    h5py = import_h5py()
    from ips.version import __version__

    device = torch.device(device)
    slide = Path(slide)
    if settings.coords_from is None:
        source = open_source(slide, patch_size=settings.patch_size, grid=settings.grid)
    else:
        source = _at_bag_tiles(slide, settings)
    if source.channels not in (1, 3):
        raise InputError(f"{slide}: {source.channels} channels; the encoders read RGB or grey")
    n, width = len(source), extractor.feature_dim
    loader = DataLoader(
        TileBatches(source, batch_size),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    bar = progress(n, slide.stem) if progress is not None else None
    mpp = float("nan") if source.mpp is None else float(source.mpp)
    try:
        with atomic_write(bag, "w+b") as fh, h5py.File(fh, "w") as out:
            features = out.create_dataset("features", shape=(n, width), dtype="float32")
            coords = out.create_dataset("coords", data=np.asarray(source.coords, dtype=np.int64))
            coords.attrs.update(_tile_attrs(source))  # where CLAM and TRIDENT look
            start = 0
            with torch.inference_mode(), autocast(device, settings.amp, option="--amp"):
                for tiles in loader:  # (b, 3, P, P) uint8
                    emb = extractor(tiles.to(device, non_blocking=True)).cpu().numpy()  # (b, F)
                    finite = np.isfinite(emb).all(axis=1)
                    if not finite.all():
                        raise InputError(
                            f"{slide}: the encoder gave NaN or inf features for "
                            f"{int((~finite).sum())} tile(s), e.g. at level-0 "
                            f"{tuple(source.coords[start + int(np.argmin(finite))])}"
                        )
                    features[start : start + len(emb)] = emb
                    start += len(emb)
                    if bar is not None:
                        bar.update(len(emb))
            if start != n:
                raise RuntimeError(f"{slide}: encoded {start} tiles, expected {n}")
            w0, h0 = source.level0_size
            out.attrs.update(
                {
                    "patch_size": int(source.patch_size),
                    "downsample": float(source.downsample),
                    "level": int(source.level),
                    "mpp": mpp,
                    "tile_mpp": mpp * float(source.downsample),
                    "encoder": settings.encoder,
                    "weights": settings.weights or "none",
                    "weights_sha256": settings.weights_sha256 or "none",
                    "embedding": extractor.embedding,
                    "amp": settings.amp,
                    "feature_dim": int(width),
                    "tissue": settings.grid.tissue,
                    "min_tissue": float(settings.grid.min_tissue),
                    "normalize_mean": np.asarray(extractor.mean, dtype=np.float64),
                    "normalize_std": np.asarray(extractor.std, dtype=np.float64),
                    "slide": slide.name,
                    "level0_width": int(w0),
                    "level0_height": int(h0),
                    "ips_version": __version__,
                    "extraction": settings.to_json(),
                }
            )
    finally:
        source.close()
        if bar is not None:
            bar.close()
    return n


CPU_TILE_BATCH = 16  # the ResNet trunks' fastest on 2 CPU cores (benchmarks/extraction.md)


def default_batch_size(encoder: str, device: torch.device) -> int:
    """Tiles per encoder call when none is given: on a CPU a preset's fastest, else
    CPU_TILE_BATCH; 64 elsewhere."""
    if device.type == "cpu":
        return PRESETS[encoder].cpu_batch_size if encoder in PRESETS else CPU_TILE_BATCH
    return 64


def _tile_attrs(source: PatchSource) -> dict[str, Any]:
    """The tile geometry as other tools record it on ``coords`` (CLAM: patch_size at
    patch_level; TRIDENT: patch_size_level0 and magnifications)."""
    attrs: dict[str, Any] = {
        "patch_size": int(source.patch_size),
        "patch_level": int(source.level),
        "downsample": float(source.downsample),
        "patch_size_level0": int(round(source.patch_size_level0)),
    }
    if source.mpp:  # 10 microns per pixel at 1x: 0.25 um/px is "40x"
        attrs["level0_magnification"] = round(10.0 / source.mpp, 2)
        attrs["target_magnification"] = round(10.0 / (source.mpp * source.downsample), 2)
    return attrs


def _at_bag_tiles(slide: Path, settings: ExtractionSettings) -> PatchSource:
    """The slide read at the tiles of its bag in ``settings.coords_from`` (ours, CLAM's or
    TRIDENT's ``.h5``), at the settings' resolution, which must give the bag's tile side."""
    h5py = import_h5py()
    folder = Path(settings.coords_from)
    bag = next(
        (
            folder / f"{slide.stem}{s}"
            for s in (".h5", ".hdf5")
            if (folder / f"{slide.stem}{s}").is_file()
        ),
        None,
    )
    if bag is None:
        raise MissingFileError(f"{slide}: no bag {slide.stem}.h5 in {folder} to take tiles from")
    try:
        with h5py.File(bag, "r") as f:
            if "coords" not in f:
                raise InputError(f"{bag}: no 'coords' dataset (N, 2) to take tiles from")
            coords = np.asarray(f["coords"][()])
            side = tile_size_level0(f)
    except OSError as err:
        raise InputError(f"{bag}: cannot read as HDF5 ({_one_line(err)})") from None
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
        raise InputError(f"{bag}: coords must be (N, 2) with N >= 1, got {coords.shape}")
    grid = dataclasses.replace(settings.grid, tissue="none")  # the bag chose the tiles
    source = open_source(slide, patch_size=settings.patch_size, grid=grid)
    if side is not None and abs(side - source.patch_size_level0) > 0.5:
        raise InputError(
            f"{bag}: its tiles are {side:g} level-0 pixels wide, --patch-size "
            f"{settings.patch_size} at downsample {source.downsample:g} reads "
            f"{source.patch_size_level0:g}; read at downsample {side / settings.patch_size:g} "
            "(or the matching level / target mpp) to reuse them"
        )
    return source.at_coords(coords)


def bag_settings(path: str | os.PathLike) -> str | None:
    """The ``extraction`` attribute of a bag (its settings as JSON), None when it has none."""
    h5py = import_h5py()
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("extraction")
    except OSError as err:
        raise InputError(
            f"{path}: an existing bag cannot be read ({' '.join(str(err).split())}); "
            "delete it to extract the slide again"
        ) from None
    if isinstance(value, bytes):
        value = value.decode()
    return None if value is None else str(value)


# ---- many slides ------------------------------------------------------------------------------


def summary_path(out_dir: str | os.PathLike, rank: int = 0, world_size: int = 1) -> Path:
    """Where the process of `rank` writes its summary."""
    name = SUMMARY if world_size == 1 else f"extraction_summary.rank{rank}.json"
    return Path(out_dir) / name


def extract_features(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    encoder: str = "resnet50_4blocks",
    weights: str | None = None,
    patch_size: int = 256,
    grid: GridConfig = EXTRACTION_GRID,
    amp: str = "auto",
    seed: int = 0,
    coords_from: str | os.PathLike | None = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write one feature bag per slide into `out_dir`; see the module docstring.

    Args:
        inputs: slide files, folders (a CAMELYON16 folder gives all its slides) and ``.txt``
            lists of slide paths.
        out_dir: the folder of bags (created).
        encoder, weights, patch_size, grid, seed: see `ExtractionSettings`.
        amp: "auto" (bf16 where the device has bf16 units, else float32), "none", "bf16",
            "fp16"; the bags record what it resolved to.
        coords_from: a folder of bags (ours, or CLAM / TRIDENT ``.h5`` with ``coords``):
            each slide's tiles are read at that bag's coordinates instead of a new grid, so
            two encoders' bags share their tiles.
        batch_size: tiles per encoder call; None: on a CPU the fastest measured for the
            preset (`TimmPreset.cpu_batch_size`; 64 for the other encoders), 64 elsewhere.
        num_workers: DataLoader processes reading tiles.
        device: where the encoder runs.
        rank, world_size: this process takes the slides i with i % world_size == rank;
            default from ``RANK`` / ``WORLD_SIZE`` (torchrun), else 0 and 1.
        progress: show progress bars (slides, and the tiles of the current slide).

    Returns:
        The summary also written to `summary_path(out_dir, rank, world_size)`: ``settings``,
        ``slides`` (this process's count), ``extracted`` ({slide, path, bag, patches, seconds}),
        ``skipped`` (bags already there: {slide, path, bag}), ``failed`` ({slide, path,
        error: one line naming the slide}), ``seconds``.

    Raises:
        WriteError: a bag or the summary could not be written (a full disk, no permission):
            extraction stops with one line naming the file; the bags finished before it stay,
            the summary as of the last finished slide too, and a rerun skips them.
    """
    published = weights is None or str(weights) in PUBLISHED
    if not published and not Path(weights).expanduser().is_file():
        raise MissingFileError(f"weights: {weights}: no such file")
    if coords_from is not None and not Path(coords_from).is_dir():
        raise MissingFileError(f"coords_from: {coords_from}: no such folder of bags")
    settings = ExtractionSettings(
        encoder=encoder,
        weights=None if weights is None else str(weights),
        patch_size=patch_size,
        grid=grid,
        amp=resolve_amp(torch.device(device), amp),
        seed=seed,
        weights_sha256=None if published else sha256_of(Path(weights).expanduser()),
        coords_from=None if coords_from is None else str(Path(coords_from).resolve()),
    )
    if batch_size is None:
        batch_size = default_batch_size(encoder, torch.device(device))
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    env = distributed.from_environment()
    rank = env.rank if rank is None else rank
    world_size = env.world_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank must be in [0, world_size), got {rank} and {world_size}")
    import_h5py()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slides = find_slides(inputs)[rank::world_size]
    wanted = settings.to_json()
    todo, skipped = [], []
    for slide in slides:
        bag = out / f"{slide.stem}.h5"
        if not bag.exists():
            todo.append((slide, bag))
            continue
        found = bag_settings(bag)
        if not same_settings(found, wanted):
            raise InputError(
                f"{bag}: extracted with other settings ({found}), not {wanted}; "
                "write to another folder or delete the old bags"
            )
        skipped.append({"slide": slide.stem, "path": str(slide), "bag": str(bag)})
    summary: dict[str, Any] = {
        "out_dir": str(out),
        "rank": rank,
        "world_size": world_size,
        "settings": json.loads(wanted),
        "slides": len(slides),
        "extracted": [],
        "skipped": skipped,
        "failed": [],
        "seconds": 0.0,
    }
    where = summary_path(out, rank, world_size)
    if skipped:
        log.info("%d of %d slides already have bags: skipped", len(skipped), len(slides))
    if todo:
        device = torch.device(device)
        extractor = build_extractor(
            settings.encoder, settings.weights, patch_size=settings.patch_size, seed=seed
        ).to(device)
        log.info(
            "extracting %d slides with %s (F = %d) into %s",
            len(todo),
            settings.encoder,
            extractor.feature_dim,
            out,
        )
        show = progress and rank == 0
        slide_bar = bars.bar(len(todo), "slides", unit="slide", show=show)

        def tile_bars(total: int, name: str) -> Any:
            return bars.bar(total, name, unit="tile", leave=False, show=show)

        for slide, bag in todo:
            began = time.perf_counter()
            try:
                n = extract_slide(
                    slide,
                    bag,
                    extractor,
                    settings,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    device=device,
                    progress=tile_bars,
                )
            except WriteError:  # a full disk or a folder we may not write: every bag would fail
                raise
            except Exception as err:  # any other failure of one slide: report it, go on
                message = _one_line(err)
                if str(slide) not in message and slide.name not in message:
                    message = f"{slide}: {message}"
                log.warning("skipped %s", message)
                log.debug("%s failed", slide, exc_info=err)
                summary["failed"].append(
                    {"slide": slide.stem, "path": str(slide), "error": message}
                )
            else:
                seconds = time.perf_counter() - began
                summary["extracted"].append(
                    {
                        "slide": slide.stem,
                        "path": str(slide),
                        "bag": str(bag),
                        "patches": n,
                        "seconds": round(seconds, 3),
                    }
                )
                log.debug("%s: %d tiles in %.1f s", slide.stem, n, seconds)
            summary["seconds"] = round(time.perf_counter() - started, 3)
            _write_summary(where, summary)
            slide_bar.update(1)
        slide_bar.close()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    _write_summary(where, summary)
    summary["summary"] = str(where)
    return summary


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(summary, fh, indent=1)
        fh.write("\n")


def _one_line(err: BaseException) -> str:
    """One line, at most 300 characters; for an error raised in a DataLoader worker, the
    original error's last line."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    text = " ".join(text.split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
