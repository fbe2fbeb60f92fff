"""Peak memory of one IPS training step, against N, each measurement in a fresh process.

`bench_memory` measures the peak resident memory and the wall time of ONE training
step (selection, forward, backward, optimizer step) of B images with N patches each, for
increasing N. Every measurement runs in a fresh Python process, so peaks do not mix and the
import-time memory of one run never hides the step of another.

Inputs are read lazily from disk, as in real use:
    pixels: synthetic pyramidal TIFF slides (`ips.sources.write_synthetic_slide`), cut into
        patches of P pixels and read through `TiffSource`; or a user's slide (`slide=`),
        whose N is its number of tissue patches.
    features: an N x F float32 `.npy` file per N, read row by row by
        `ips.data.feature_bags.FeatureFile` (file reads, no memory map: pages of a map would
        count as resident memory of the process).

Methods:
    ips: select M of the N patches without gradients (chunks of I), train on those M.
    full: no selection: all N patches are encoded with gradients (M >= N); run up to N <= a cap.

Peaks: `peak_rss_mb` is the whole process's high-water mark (`ru_maxrss`, imports included);
`peak_rss_above_baseline_mb` is the high-water mark during the step minus the resident memory
just before it (`baseline_rss_mb`: after imports, model and optimizer creation and opening the
inputs, which for a slide includes loading its tile index); on Linux the mark is reset there
(`/proc/self/clear_refs`), elsewhere `ru_maxrss` is used (helpers: `ips.rss`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ips.data.feature_bags import FeatureFile
from ips.errors import InputError
from ips.files import atomic_write
from ips.rss import max_rss_mb, peak_rss_since_reset_mb, reset_peak_rss, rss_mb

logger = logging.getLogger(__name__)

INPUTS = ("pixels", "features")
METHODS = ("ips", "full")
DEFAULT_NUM_PATCHES = (1000, 10000, 100000, 250000)
# MemoryCase fields that must be positive integers (threads when given)
POSITIVE_FIELDS = tuple(
    "batch_size memory_size chunk_size patch_size feature_dim embed_dim threads".split()
)
PIXEL_ENCODER = "resnet18_2blocks"
MEMORY_KEYS = (
    "method",
    "input",
    "num_patches",
    "batch_size",
    "memory_size",
    "chunk_size",
    "peak_rss_mb",
    "peak_rss_above_baseline_mb",
    "seconds",
)  # every successful memory record has at least these


# ---- inputs on disk -----------------------------------------------------------------------


def write_features(
    path: str | os.PathLike, *, num_patches: int, feature_dim: int, seed: int = 0
) -> Path:
    """Write an (N, F) float32 `.npy` file of standard-normal rows, block by block.

    The file is written under a temporary name and renamed, so a reused path is complete.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    block = max(1, 2**24 // (4 * feature_dim))  # rows per 16 MiB block
    with atomic_write(path) as fh:
        header = {"descr": "<f4", "fortran_order": False, "shape": (num_patches, feature_dim)}
        np.lib.format.write_array_header_2_0(fh, header)
        for start in range(0, num_patches, block):
            rows = min(block, num_patches - start)
            fh.write(rng.standard_normal((rows, feature_dim), dtype=np.float32).tobytes())
    return path


def slide_grid(num_patches: int) -> tuple[int, int]:
    """(rows, cols) of the smallest near-square grid holding N patches."""
    cols = math.ceil(math.sqrt(num_patches))
    return math.ceil(num_patches / cols), cols


def _generated_slide(workdir: Path, num_patches: int, patch_size: int, seed: int) -> Path:
    """A synthetic slide whose patch grid holds at least N patches (the first N are used).

    Tiles are as large as a patch (rounded up to a multiple of 16), so reading a patch decodes
    about one tile, as with slides tiled at the patch size.
    """
    from ips.sources import write_synthetic_slide

    rows, cols = slide_grid(num_patches)
    tile = max(16, math.ceil(patch_size / 16) * 16)
    path = workdir / f"slide_{cols * patch_size}x{rows * patch_size}_t{tile}_s{seed}.tif"
    if not path.exists():
        start = time.perf_counter()
        write_synthetic_slide(
            path, width=cols * patch_size, height=rows * patch_size, tile_size=tile, seed=seed
        )
        logger.info("wrote %s in %.1f s", path.name, time.perf_counter() - start)
    return path


def _generated_features(workdir: Path, num_patches: int, feature_dim: int, seed: int) -> Path:
    path = workdir / f"features_{num_patches}x{feature_dim}_s{seed}.npy"
    if not path.exists():
        start = time.perf_counter()
        write_features(path, num_patches=num_patches, feature_dim=feature_dim, seed=seed)
        logger.info("wrote %s in %.1f s", path.name, time.perf_counter() - start)
    return path


# ---- one measurement ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryCase:
    """One measurement: everything the child process needs, as plain data."""

    method: str  # "ips" (select M of N, train on M) or "full" (train on all N)
    input: str  # "pixels" (patches of a slide) or "features" (rows of an .npy file)
    path: str  # the slide or .npy file; each of the B images reads its own handle on it
    num_patches: int  # N: patches per image (the first N of a generated slide's grid)
    batch_size: int = 2  # B: images per step
    memory_size: int = 100  # M: patches kept (for "full": N)
    chunk_size: int = 100  # I: patches scored per iteration (for "full": N)
    patch_size: int = 32  # P: patch side in pixels (pixels input)
    feature_dim: int = 512  # F: feature width (features input)
    embed_dim: int = 128  # D: embedding width
    encoder_batch_size: int | None = None  # patches per encoder call during selection
    encoder: str = PIXEL_ENCODER  # the pixel encoder (pixels input)
    activation_checkpointing: bool = False  # recompute encoder activations in backward
    tile_cache_mb: float = 8.0  # decoded-tile cache of each slide reader
    tissue: str | None = None  # tissue filter of a user's slide ("otsu"); None: whole grid
    device: str = "cpu"  # where the model runs
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)
    seed: int = 0  # weights, targets and selection order


def _open_image(case: MemoryCase) -> Any:
    """One image of the batch: a lazy patch container over `case.path` with N patches."""
    if case.input == "features":
        return FeatureFile(case.path)
    from ips.sources import TiffSource, open_source

    if case.tissue is not None:
        return open_source(
            case.path, patch_size=case.patch_size, tissue=case.tissue, cache_mb=case.tile_cache_mb
        )
    source = TiffSource(case.path, patch_size=case.patch_size, cache_mb=case.tile_cache_mb)
    if len(source) > case.num_patches:  # keep the first N patches of the grid
        rows, cols = source.grid_shape
        keep = np.arange(rows * cols).reshape(rows, cols) < case.num_patches
        source = TiffSource(
            case.path, patch_size=case.patch_size, cache_mb=case.tile_cache_mb, tissue=keep
        )
    if len(source) != case.num_patches:
        raise InputError(f"{case.path}: expected {case.num_patches} patches, got {len(source)}")
    return source


def run_memory_case(case: MemoryCase) -> dict[str, Any]:
    """Run one training step in THIS process and measure it (`measure_memory` runs it fresh).

    Returns:
        The record: the case's settings, peak_rss_mb, baseline_rss_mb,
        peak_rss_above_baseline_mb, seconds, peak_device_mb (CUDA only), torch, device.
    """
    import gc

    import torch

    from ips.heads import compute_loss
    from ips.model import create_model

    if case.threads is not None:
        torch.set_num_threads(case.threads)
    torch.manual_seed(case.seed)
    device = torch.device(case.device)
    model_args: dict[str, Any] = dict(
        embed_dim=case.embed_dim,
        memory_size=case.memory_size,
        chunk_size=case.chunk_size,
        encoder_batch_size=case.encoder_batch_size,
        loading="lazy",
        tasks={"label": {"kind": "binary"}},
    )
    if case.input == "features":
        model_args.update(encoder="features", feature_dim=case.feature_dim)
    else:
        model_args.update(encoder=case.encoder, in_channels=3, patch_size=case.patch_size)
    model = create_model(**model_args).to(device).train()
    model.set_grad_checkpointing(case.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = [_open_image(case) for _ in range(case.batch_size)]
    for image in images:  # open the file handles (and a slide's tile index) before the baseline
        image.read(np.zeros(1, dtype=np.int64))
    targets = {"label": torch.randint(0, 2, (case.batch_size,), device=device).float()}
    generator = torch.Generator().manual_seed(case.seed)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        device_base = torch.cuda.memory_allocated(device)
    baseline = rss_mb() or max_rss_mb()  # without /proc: the mark so far
    reset = reset_peak_rss()

    start = time.perf_counter()
    out = model(images, generator=generator)  # select (no gradients), encode M, pool, heads
    loss, _ = compute_loss(out.logits, targets, model.tasks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    peak = max_rss_mb()
    step_peak = peak_rss_since_reset_mb() if reset else peak
    record = dataclasses.asdict(case)
    record.update(
        peak_rss_mb=round(peak, 1),
        baseline_rss_mb=round(baseline, 1),
        peak_rss_above_baseline_mb=round(step_peak - baseline, 1),
        seconds=round(seconds, 3),
        peak_device_mb=(
            round((torch.cuda.max_memory_allocated(device) - device_base) / 2**20, 1)
            if cuda
            else None
        ),
        loss=loss.item(),
        torch=torch.__version__,
        cpus=os.cpu_count(),
        status="ok",
    )
    return record


def _child_main() -> None:
    """Entry point of a measuring process: a MemoryCase as JSON on stdin, a record on stdout."""
    case = MemoryCase(**json.loads(sys.stdin.read()))
    print(json.dumps(run_memory_case(case)), flush=True)


def measure_memory(case: MemoryCase, *, timeout: float | None = None) -> dict[str, Any]:
    """Measure one case in a fresh Python process.

    Returns:
        The record of `run_memory_case`; when the process fails or runs past `timeout`
        seconds, the case's settings with `status` saying why and the figures None.
    """
    command = [sys.executable, "-c", "from ips.bench.memory import _child_main; _child_main()"]
    failed = dataclasses.asdict(case)
    failed.update(peak_rss_mb=None, peak_rss_above_baseline_mb=None, seconds=None)
    try:
        done = subprocess.run(
            command,
            input=json.dumps(dataclasses.asdict(case)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {**failed, "status": f"timeout after {timeout:g} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode}"
        if done.returncode < 0:
            why = f"killed by signal {-done.returncode} (out of memory?)"
        return {**failed, "status": f"failed: {why}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the sweep ----------------------------------------------------------------------------


def bench_memory(
    *,
    input: str = "features",
    num_patches: Iterable[int] | None = None,
    methods: Iterable[str] = METHODS,
    batch_size: int = 2,
    memory_size: int = 100,
    chunk_size: int = 100,
    patch_size: int = 32,
    feature_dim: int = 512,
    embed_dim: int = 128,
    full_max: int = 10000,
    slide: str | os.PathLike | None = None,
    tissue: str = "otsu",
    encoder_batch_size: int | None = None,
    encoder: str = PIXEL_ENCODER,
    activation_checkpointing: bool = False,
    tile_cache_mb: float = 8.0,
    device: str = "cpu",
    threads: int | None = None,
    seed: int = 0,
    timeout: float | None = None,
    workdir: str | os.PathLike | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Peak memory and time of one training step for each N and method, each in a fresh process.

    Args:
        input: "pixels" or "features".
        num_patches: the N to measure (default 1000, 10000, 100000, 250000); not with `slide`.
        methods: any of "ips" and "full".
        batch_size: B.
        memory_size: M.
        chunk_size: I.
        patch_size: P, pixels.
        feature_dim: F, features.
        embed_dim: D.
        full_max: "full" runs only for N <= full_max.
        slide: a user's slide instead of generated ones; N is its number of tissue patches.
        tissue: tissue filter for `slide` ("otsu", a mask image or GeoJSON path).
        encoder_batch_size: patches per encoder call during selection; None: a whole chunk.
        encoder: the pixel encoder (any registered name).
        activation_checkpointing: recompute the encoder's activations in the backward pass
            (``train.activation_checkpointing``).
        tile_cache_mb: decoded-tile cache of each slide reader.
        device: "cpu", "cuda", ...
        threads: torch CPU threads in each measuring process; None: torch's default.
        seed: inputs, weights, targets and selection order.
        timeout: seconds allowed per measurement.
        workdir: where generated inputs are written and reused; default a temporary folder,
            removed afterwards.
        on_record: called with each record as soon as it is measured.

    Returns:
        One record per measurement (see `run_memory_case`), in the order measured.
    """
    if input not in INPUTS:
        raise InputError(f"input must be one of {INPUTS}, got {input!r}")
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"methods must be among {METHODS}, got {list(methods)}")
    base = MemoryCase(
        method="ips",
        input=input,
        path="",
        num_patches=1,
        batch_size=batch_size,
        memory_size=memory_size,
        chunk_size=chunk_size,
        patch_size=patch_size,
        feature_dim=feature_dim,
        embed_dim=embed_dim,
        encoder_batch_size=encoder_batch_size,
        encoder=encoder,
        activation_checkpointing=activation_checkpointing,
        tile_cache_mb=tile_cache_mb,
        device=str(device),
        threads=threads,
        seed=seed,
    )
    for name in POSITIVE_FIELDS:
        value = getattr(base, name)
        if value is not None and (int(value) != value or value < 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if slide is not None:
        if input != "pixels":
            raise InputError("slide needs input 'pixels'")
        if num_patches is not None:
            raise InputError("give num_patches or slide, not both: a slide's N is its tissue")
    sizes = list(DEFAULT_NUM_PATCHES if num_patches is None else num_patches)
    if not sizes or any(int(n) != n or n < 1 for n in sizes):
        raise InputError(f"num_patches must be positive integers, got {sizes}")

    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ips-bench-") as scratch:
        folder = Path(workdir) if workdir is not None else Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        if slide is not None:
            inputs = [(_slide_patches(slide, patch_size, tissue, tile_cache_mb), str(slide))]
            base = dataclasses.replace(base, tissue=str(tissue))
        else:
            inputs = [(int(n), "") for n in sorted(set(sizes))]
        for n, path in inputs:
            wanted = [m for m in methods if m == "ips" or n <= full_max]
            if not wanted:
                continue
            if not path:
                path = str(
                    _generated_features(folder, n, feature_dim, seed)
                    if input == "features"
                    else _generated_slide(folder, n, patch_size, seed)
                )
            for method in wanted:
                case = dataclasses.replace(base, method=method, path=path, num_patches=n)
                if method == "full":  # M >= N: nothing is selected, every patch is trained on
                    case = dataclasses.replace(case, memory_size=n, chunk_size=n)
                record = measure_memory(case, timeout=timeout)
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


def _slide_patches(
    slide: str | os.PathLike, patch_size: int, tissue: str, tile_cache_mb: float
) -> int:
    from ips.sources import open_source

    source = open_source(slide, patch_size=patch_size, tissue=tissue, cache_mb=tile_cache_mb)
    return len(source)


# ---- reporting ----------------------------------------------------------------------------


def memory_table(records: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of memory records."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"

    header = (
        "| method | input | N | B | M | I | peak RSS (MiB) | baseline (MiB) "
        "| step peak above baseline (MiB) | step (s) | status |"
    )
    lines = [header, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in records:
        values = [r["num_patches"], r["batch_size"], r["memory_size"], r["chunk_size"]]
        figures = [
            r["peak_rss_mb"],
            r.get("baseline_rss_mb"),
            r["peak_rss_above_baseline_mb"],
            r["seconds"],
        ]
        lines.append(
            f"| {r['method']} | {r['input']} | "
            + " | ".join(cell(v) for v in values + figures)
            + f" | {r.get('status', 'ok')} |"
        )
    return "\n".join(lines)


def plot_memory(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Draw peak RSS (whole process, and above the baseline) against N, one line per method and
    input, log-x; failed measurements are left out. Returns: the image path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    keys = ("peak_rss_mb", "peak_rss_above_baseline_mb")
    titles = ("peak RSS, whole process", "peak RSS during the step, above baseline")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status", "ok") == "ok":
            groups.setdefault((r["method"], r["input"]), []).append(r)
    colors = {kind: f"C{i}" for i, kind in enumerate(INPUTS)}  # colour: input; line: method
    styles = {"ips": "-", "full": "--"}
    for ax, key, title in zip(axes, keys, titles, strict=True):
        for (method, kind), rows in sorted(groups.items(), key=lambda item: item[0][::-1]):
            rows = sorted(rows, key=lambda r: r["num_patches"])
            ax.plot(
                [r["num_patches"] for r in rows],
                [r[key] for r in rows],
                marker="o",
                color=colors.get(kind),
                linestyle=styles.get(method, "-"),
                label=f"{method} ({kind})",
            )
        ax.set_xscale("log")
        ax.set_xlabel("N, patches per image")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
