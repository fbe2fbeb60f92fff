"""The feature-bag input of the speed benchmark (``ips bench speed --input features``).

The paper's headline setting: whole slides as precomputed features, B = 16 slides of up to
250k patches, F = 2048 features projected to D = 512, M = I = 5000 (``--config camelyon16``).

Inputs: B bags of N rows of F standard-normal float32 features (seeded, one stream per bag;
two equal rows would take F equal draws, so no row repeats), written once to temporary HDF5
files in the layout of ``ips extract-features`` (`write_feature_bags`) and read lazily
through `H5FeatureBag`, as training reads them, in the config's ``selection.loading`` mode.

The floor has three parts, each timed on its own (median of the repetitions):

    read      every row of every bag read once from its file, in contiguous blocks of about
              16 MiB (``bytes_read`` = B x N x F x 4)
    no_grad   every row projected once without gradients (LayerNorm -> Linear -> BatchNorm
              -> ReLU in eval mode) at the projector's best batch size, from rows already on
              the device: a resident sample cycled through until B x N rows are projected
              (the projector's cost depends on the number of rows, not on their values)
    grad      forward and backward of the B x M kept rows through projector, pooling and
              heads, with the loss (train mode)

floor = read + no_grad + grad. Steps, inference and the baseline read through the bags, and
their records carry the bytes the bags read per run and the seconds spent in those reads
(selection reads the next chunk in a background thread, so part of that time overlaps
encoding). Files just written usually sit in the operating system's page cache: "read" then
measures HDF5 and memory copies, not the disk, unless the bags outgrow the free memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ips.bench.measuring import (
    Floors,
    Meter,
    ReadCounter,
    amp_supported,
    best_batch_size,
    encode_all,
    floor_record,
    random_target,
)
from ips.config import Config, replace_fields
from ips.data.feature_bags import FeatureBag, H5FeatureBag, import_h5py
from ips.errors import InputError
from ips.heads import compute_loss
from ips.model import IPSModel
from ips.precision import autocast
from ips.selection import embed_valid, gather_patches

FEATURE_BATCH_SIZES = (64, 256, 1024, 4096, 16384)  # tried for the projector's best batch
PATCH_SIZE = 256  # level-0 tile side the bags record (CAMELYON16's tiles)
BLOCK_BYTES = 2**24  # rows per write and per floor read: about 16 MiB


class CountedBag(H5FeatureBag):
    """An HDF5 feature bag that adds the bytes and seconds of its reads to a counter.

    Args:
        path: the ``.h5`` bag.
        counter: where its reads are counted.
    """

    def __init__(self, path: str | os.PathLike, counter: ReadCounter) -> None:
        super().__init__(path)
        self.counter = counter

    def _rows(self, ids: np.ndarray | slice) -> np.ndarray:
        start = time.perf_counter()
        rows = super()._rows(ids)
        self.counter.add(rows.nbytes, time.perf_counter() - start)
        return rows

    def _rows_into(self, rows: slice, out: np.ndarray) -> np.ndarray | None:
        start = time.perf_counter()
        got = super()._rows_into(rows, out)
        if got is not None:  # else `_rows` reads (and counts) them
            self.counter.add(got.nbytes, time.perf_counter() - start)
        return got


@dataclasses.dataclass(frozen=True)
class FeatureSpeedBatch:
    """The B feature bags every measurement runs on.

    patches: B bags of (N, F) rows, read lazily from their files.
    targets: per task, (B,) on the CPU.
    paths: the bag files.
    reads: counts every read of the bags.
    grid_shape: None (the bags carry their coords).
    """

    patches: list[FeatureBag]
    targets: dict[str, Tensor]
    paths: list[Path]
    reads: ReadCounter
    grid_shape: tuple[int, int] | None = None

    @property
    def batch_size(self) -> int:
        """B."""
        return len(self.patches)

    @property
    def num_patches(self) -> int:
        """N."""
        return len(self.patches[0])

    @property
    def feature_dim(self) -> int:
        """F."""
        return self.patches[0].feature_dim

    def close(self) -> None:
        """Close the bags' files."""
        for bag in self.patches:
            bag.close()


def feature_config(config: Config, feature_dim: int) -> Config:
    """The config with ``model.feature_dim`` = F; it must use the features encoder."""
    if config.model.encoder != "features":
        raise InputError(
            "input 'features' needs model.encoder 'features' (e.g. --config camelyon16), "
            f"got {config.model.encoder!r}"
        )
    if feature_dim < 1:
        raise InputError(f"feature_dim (F) must be >= 1, got {feature_dim}")
    return replace_fields(config, feature_dim=feature_dim)


def write_feature_bags(
    folder: str | os.PathLike,
    *,
    batch_size: int,
    num_patches: int,
    feature_dim: int,
    seed: int = 0,
) -> list[Path]:
    """Write B bags ``bag_<b>.h5`` of N standard-normal float32 rows of F features to `folder`
    (made if missing).

    The layout of ``ips extract-features``: ``features`` (N, F) float32, contiguous; ``coords``
    (N, 2) int64 level-0 (x, y) on a near-square raster of PATCH_SIZE tiles, with the tile
    attributes where CLAM and TRIDENT look; the file's tile attributes. Rows are written in
    blocks of about 16 MiB, so N x F never needs to fit in memory.

    Returns:
        The B paths.
    """
    if batch_size < 1 or num_patches < 1 or feature_dim < 1:
        raise InputError(
            f"feature bags need B, N, F >= 1, got B={batch_size}, N={num_patches}, F={feature_dim}"
        )
    h5py = import_h5py()
    from ips.version import __version__

    Path(folder).mkdir(parents=True, exist_ok=True)
    cols = math.ceil(math.sqrt(num_patches))
    ids = np.arange(num_patches)
    coords = np.stack([ids % cols, ids // cols], axis=1).astype(np.int64) * PATCH_SIZE
    rows_per_block = max(1, BLOCK_BYTES // (4 * feature_dim))
    tile = {"patch_size": PATCH_SIZE, "patch_level": 0, "downsample": 1.0}
    paths = []
    for b in range(batch_size):
        path = Path(folder) / f"bag_{b}.h5"
        rng = np.random.default_rng([seed, b])
        with h5py.File(path, "w") as out:
            features = out.create_dataset("features", (num_patches, feature_dim), "float32")
            for start in range(0, num_patches, rows_per_block):
                stop = min(num_patches, start + rows_per_block)
                features[start:stop] = rng.standard_normal(
                    (stop - start, feature_dim), dtype=np.float32
                )
            out.create_dataset("coords", data=coords).attrs.update(
                {**tile, "patch_size_level0": PATCH_SIZE}
            )
            out.attrs.update(
                {
                    **tile,
                    "level": 0,
                    "encoder": "random normal (ips bench speed)",
                    "feature_dim": feature_dim,
                    "slide": path.stem,
                    "level0_width": int(coords[:, 0].max()) + PATCH_SIZE,
                    "level0_height": int(coords[:, 1].max()) + PATCH_SIZE,
                    "ips_version": __version__,
                }
            )
        paths.append(path)
    return paths


def make_feature_batch(
    config: Config, folder: str | os.PathLike, *, batch_size: int, num_patches: int, seed: int
) -> FeatureSpeedBatch:
    """B bags of N rows of F = ``config.model.feature_dim`` features written to `folder`,
    opened lazily, with random targets for the config's tasks."""
    feature_dim = config.model.feature_dim
    if feature_dim is None:
        raise InputError("input 'features' needs model.feature_dim (F)")
    paths = write_feature_bags(
        folder, batch_size=batch_size, num_patches=num_patches, feature_dim=feature_dim, seed=seed
    )
    reads = ReadCounter()
    bags: list[FeatureBag] = [CountedBag(path, reads) for path in paths]
    g = torch.Generator().manual_seed(seed)
    targets = {task.name: random_target(task, batch_size, g) for task in config.model.tasks}
    return FeatureSpeedBatch(bags, targets, paths, reads)


# ---- the floor ------------------------------------------------------------------------------


def read_every_row(paths: Sequence[Path]) -> int:
    """Read every row of every bag once, in contiguous blocks of about 16 MiB.

    Returns:
        The bytes read.
    """
    h5py = import_h5py()
    total = 0
    for path in paths:
        with h5py.File(path, "r") as f:
            features = f["features"]
            n, width = features.shape
            row_bytes = width * features.dtype.itemsize
            rows = max(1, min(n, BLOCK_BYTES // row_bytes))
            buffer = np.empty((rows, width), dtype=features.dtype)
            for start in range(0, n, rows):
                count = min(rows, n - start)
                features.read_direct(buffer, np.s_[start : start + count], np.s_[:count])
                total += count * row_bytes
    return total


def project_rows(
    encoder: nn.Module, sample: Tensor, total: int, batch_size: int, amp: str = "none"
) -> None:
    """Project ``total`` rows without gradients, cycling through the rows of ``sample``
    (n, F) on the device."""
    passes, rest = divmod(total, len(sample))
    for _ in range(passes):
        encode_all(encoder, sample, batch_size, amp)
    if rest:
        encode_all(encoder, sample[:rest], batch_size, amp)


def _grad_pass(
    model: IPSModel, kept: Tensor, valid: Tensor, targets: dict[str, Tensor], amp: str
) -> None:
    """Forward and backward of the kept rows (n_valid, F) laid out as valid (B, K):
    projector, pooling, heads and loss."""
    model.zero_grad(set_to_none=True)
    with autocast(model.device, amp):
        emb = embed_valid(model.encoder, kept, valid)  # (B, K, D)
        pooled, _ = model.pool(emb, valid.to(model.device))  # (B, T, D)
        logits = model.forward_head(pooled)
    loss, _ = compute_loss(logits, targets, model.tasks)
    loss.backward()


def _first_rows(bags: Sequence[FeatureBag], count: int) -> Tensor:
    """The first ``count`` rows of the bags taken in order: (count, F)."""
    parts: list[np.ndarray] = []
    left = count
    for bag in bags:
        take = min(left, len(bag))
        parts.append(bag.read(np.arange(take)))
        left -= take
        if not left:
            break
    return torch.from_numpy(np.concatenate(parts))


def feature_floors(
    probe: IPSModel,
    batch: FeatureSpeedBatch,
    *,
    precisions: Sequence[str],
    meter: Meter,
    device: torch.device,
    seed: int,
    emit: Callable[[dict[str, Any]], dict[str, Any]],
) -> Floors:
    """The floor of the feature bags once per precision: read every row (measured once: it
    has no precision) + project every row without gradients + the gradient pass over the
    B x M kept rows (those the probe's selection keeps)."""
    B, N = batch.batch_size, batch.num_patches
    selected = probe.select(batch.patches, generator=torch.Generator().manual_seed(seed))
    kept = gather_patches(batch.patches, selected, device=device)  # (B x K, F)
    targets = {k: v.to(device) for k, v in batch.targets.items()}
    read = meter(read_every_row, batch.paths)
    read_bytes = B * N * batch.feature_dim * 4  # float32 rows
    sample = _first_rows(batch.patches, min(B * N, 2 * max(FEATURE_BATCH_SIZES))).to(device)
    encoder = probe.encoder
    records: dict[str, dict[str, Any]] = {}
    fp32_run: Callable[[], None] | None = None
    best = 0
    for amp in precisions:
        if not amp_supported(amp, device):
            continue
        encoder.eval()
        size, rates = best_batch_size(encoder, sample, device, amp, FEATURE_BATCH_SIZES)
        no_grad = meter(project_rows, encoder, sample, B * N, size, amp)
        probe.train()
        grad = meter(_grad_pass, probe, kept, selected.mask, targets, amp)
        probe.zero_grad(set_to_none=True)
        if amp == "none":
            best = size
            fp32_run = _floor_run(
                probe, batch.paths, sample, B * N, size, kept, selected.mask, targets
            )
        records[amp] = emit(
            floor_record(
                amp,
                B,
                {"read": read, "no_grad": no_grad, "grad": grad},
                size,
                rates,
                bytes_read=read_bytes,
            )
        )
    assert fp32_run is not None  # fp32 runs everywhere
    return Floors(records, fp32_run, best)


def _floor_run(
    probe: IPSModel,
    paths: Sequence[Path],
    sample: Tensor,
    total: int,
    batch_size: int,
    kept: Tensor,
    valid: Tensor,
    targets: dict[str, Tensor],
) -> Callable[[], None]:
    """One run of the fp32 floor, as a closure for `paired_seconds`."""

    def run() -> None:
        read_every_row(paths)
        probe.encoder.eval()
        project_rows(probe.encoder, sample, total, batch_size)
        probe.train()
        _grad_pass(probe, kept, valid, targets, "none")
        probe.zero_grad(set_to_none=True)

    return run
