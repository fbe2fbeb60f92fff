"""Feature-extraction throughput against its two floors (``ips bench extract``).

For one slide and encoder, in one process, tiles per second of:

    encode    the floor of the encoder: a resident batch of the slide's own tiles encoded
              without gradients in calls of each batch size tried (the fastest is kept)
    decode    the floor of the reader: every tile of the slide read and batched through the
              DataLoader of ``ips extract-features``, nothing encoded, for each number of
              worker processes tried
    pipeline  ``ips extract-features`` itself on the slide (read, encode, write the bag), at the
              encoder's fastest batch size, for each number of workers

and the ratio of the fastest pipeline to min(fastest decode, encode): 1 when extraction runs
at the pace of its slower half. On a CPU the two halves share the cores, so a pipeline can
reach the slower half's pace only where the other half is much faster.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ips.errors import InputError
from ips.features import ExtractionSettings, TileBatches, build_extractor, extract_slide
from ips.precision import autocast
from ips.sources import open_source

EXTRACT_BATCH_SIZES = (8, 16, 32, 64, 128)  # tried for the encoder's fastest batch
EXTRACT_WORKERS = (0, 1, 2)  # DataLoader processes tried


def bench_extraction(
    slide: str | Path,
    *,
    encoder: str = "resnet50_4blocks",
    weights: str | None = None,
    patch_size: int = 256,
    batch_sizes: Sequence[int] = EXTRACT_BATCH_SIZES,
    workers: Sequence[int] = EXTRACT_WORKERS,
    device: str = "cpu",
    amp: str = "none",
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure the encode and decode floors and the pipeline of one slide.

    Args:
        slide: the slide (any format ``ips extract-features`` reads).
        encoder, weights, patch_size, amp: as ``ips extract-features`` takes them.
        batch_sizes: encoder batch sizes tried for the encode floor; the pipeline runs at
            the fastest.
        workers: DataLoader worker counts tried for decode and the pipeline.
        device: where the encoder runs.
        on_record: called with each record as soon as it is measured.

    Returns:
        Records with measure ("encode", "decode", "pipeline", "summary"), tiles,
        seconds, tiles_per_second and batch_size / workers; the summary has the fastest of
        each, ``pipeline_over_floor`` and the measured defaults.
    """
    if not batch_sizes or any(int(b) != b or b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not workers or any(int(w) != w or w < 0 for w in workers):
        raise InputError(f"workers must be integers >= 0, got {list(workers)}")
    slide = Path(slide)
    settings = ExtractionSettings(encoder=encoder, weights=weights, patch_size=patch_size, amp=amp)
    dev = torch.device(device)
    source = open_source(slide, patch_size=patch_size, grid=settings.grid)
    tiles = len(source)
    if tiles == 0:
        raise InputError(f"{slide}: no tissue tile to extract")
    extractor = build_extractor(encoder, weights, patch_size=patch_size).to(dev)
    common = {"slide": slide.name, "tiles": tiles, "encoder": encoder, "patch_size": patch_size}
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        record = {**record, **common, "device": device, "threads": torch.get_num_threads()}
        records.append(record)
        if on_record is not None:
            on_record(record)

    sample = TileBatches(source, max(batch_sizes))[0].to(dev)  # (b, 3, P, P) uint8
    source.close()
    encode_rates = {}
    for size in sorted(batch_sizes):
        if size > len(sample) and encode_rates:
            break
        seconds = _encode_seconds(extractor, sample, size, amp)
        encode_rates[size] = len(sample) / seconds
        emit(_rate_record("encode", len(sample), seconds, batch_size=size))
    best_batch = max(encode_rates, key=encode_rates.__getitem__)

    decode_rates, pipeline_rates = {}, {}
    for count in workers:
        seconds = _decode_seconds(slide, settings, best_batch, count)
        decode_rates[count] = tiles / seconds
        emit(_rate_record("decode", tiles, seconds, batch_size=best_batch, workers=count))
    with tempfile.TemporaryDirectory(prefix="ips-bench-extract-") as tmp:
        for count in workers:
            start = time.perf_counter()
            extract_slide(
                slide,
                Path(tmp) / f"{slide.stem}_{count}.h5",
                extractor,
                settings,
                batch_size=best_batch,
                num_workers=count,
                device=dev,
            )
            seconds = time.perf_counter() - start
            pipeline_rates[count] = tiles / seconds
            emit(_rate_record("pipeline", tiles, seconds, batch_size=best_batch, workers=count))
    best_workers = max(pipeline_rates, key=pipeline_rates.__getitem__)
    floor = min(max(decode_rates.values()), encode_rates[best_batch])
    emit(
        {
            "measure": "summary",
            "encode_tiles_per_second": round(encode_rates[best_batch], 2),
            "decode_tiles_per_second": round(max(decode_rates.values()), 2),
            "pipeline_tiles_per_second": round(pipeline_rates[best_workers], 2),
            "pipeline_over_floor": round(pipeline_rates[best_workers] / floor, 3),
            "best_batch_size": best_batch,
            "best_workers": best_workers,
        }
    )
    return records


def _rate_record(measure: str, tiles: int, seconds: float, **fields: Any) -> dict[str, Any]:
    return {
        "measure": measure,
        **fields,
        "timed_tiles": tiles,
        "seconds": round(seconds, 4),
        "tiles_per_second": round(tiles / seconds, 2),
    }


def _encode_seconds(extractor: Any, sample: torch.Tensor, size: int, amp: str) -> float:
    """Seconds to encode the resident tiles in calls of ``size``, after one warm-up call."""

    def run(x: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(x.device, amp):
            for start in range(0, len(x), size):
                extractor(x[start : start + size])
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    run(sample[:size])
    start = time.perf_counter()
    run(sample)
    return time.perf_counter() - start


def _decode_seconds(slide: Path, settings: ExtractionSettings, batch: int, workers: int) -> float:
    """Seconds to read every tile of the slide through extraction's DataLoader."""
    start = time.perf_counter()
    source = open_source(slide, patch_size=settings.patch_size, grid=settings.grid)
    try:
        loader = DataLoader(TileBatches(source, batch), batch_size=None, num_workers=workers)
        for _ in loader:
            pass
    finally:
        source.close()
    return time.perf_counter() - start


def extraction_table(records: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the records."""
    lines = [
        "| measure | batch | workers | tiles | s | tiles/s |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for r in records:
        if r["measure"] == "summary":
            continue
        lines.append(
            f"| {r['measure']} | {r.get('batch_size', '–')} | {r.get('workers', '–')} | "
            f"{r['timed_tiles']} | {r['seconds']} | {r['tiles_per_second']} |"
        )
    summary = [r for r in records if r["measure"] == "summary"]
    if summary:
        s = summary[-1]
        lines.append("")
        lines.append(
            f"pipeline / min(decode, encode) = {s['pipeline_over_floor']} "
            f"({s['pipeline_tiles_per_second']} tiles/s at batch {s['best_batch_size']}, "
            f"{s['best_workers']} workers)"
        )
    return "\n".join(lines)
