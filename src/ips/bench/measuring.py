"""What the speed measurements of pixel inputs (`ips.bench.speed`) and of feature bags
(`ips.bench.feature_speed`) share: a timer that also reads peak memory and bytes read, the
back-to-back ratio of two runs, encoder throughput at a batch size, random targets.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ips.precision import autocast
from ips.rss import peak_rss_since_reset_mb, release_free_heap, reset_peak_rss, rss_mb


class ReadCounter:
    """Bytes and seconds of the reads of lazy containers, added from any thread (selection
    reads the next chunk in a background thread)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.bytes += nbytes
            self.seconds += seconds

    def totals(self) -> tuple[int, float]:
        """(bytes, seconds) read so far."""
        with self._lock:
            return self.bytes, self.seconds


class Timing(NamedTuple):
    """One measurement.

    seconds: median wall time of the timed runs.
    peak_mb: peak memory above the memory before them: on CUDA the allocator's, elsewhere the
        process's resident memory (Linux only; None elsewhere).
    peak_rss_mb: the process's resident high-water mark during the timed runs (Linux; None
        elsewhere), on every device: host memory is what lazy reading keeps small.
    bytes_read: bytes the counted containers read per run (None without a counter).
    read_seconds: seconds spent in those reads per run, mean (None without a counter).
    """

    seconds: float
    peak_mb: float | None
    peak_rss_mb: float | None
    bytes_read: int | None
    read_seconds: float | None


class Meter:
    """Median wall time over repetitions after warm-up, and the peaks of the timed runs.

    Args:
        device: where the measured code computes (CUDA is synchronised before reading a clock).
        warmup: untimed runs first.
        repeats: timed runs.
        reads: counts what lazy containers read (bytes_read, read_seconds of each Timing).
    """

    def __init__(
        self,
        device: torch.device,
        *,
        warmup: int,
        repeats: int,
        reads: ReadCounter | None = None,
    ) -> None:
        self.device, self.warmup, self.repeats, self.reads = device, warmup, repeats, reads

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Timing:
        """Time ``fn(*args, **kwargs)``."""
        for _ in range(self.warmup):
            fn(*args, **kwargs)
        self.sync()
        gc.collect()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            release_free_heap()
            base = rss_mb()
        reset = reset_peak_rss() and rss_mb() > 0
        read_before = self.reads.totals() if self.reads is not None else None
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn(*args, **kwargs)
            self.sync()
            times.append(time.perf_counter() - start)
        peak_rss = peak_rss_since_reset_mb() if reset else None
        if cuda:
            peak: float | None = torch.cuda.max_memory_allocated(self.device) / 2**20 - base
        else:
            peak = None if peak_rss is None else peak_rss - base
        bytes_read = read_seconds = None
        if self.reads is not None and read_before is not None:
            after = self.reads.totals()
            bytes_read = (after[0] - read_before[0]) // self.repeats
            read_seconds = round((after[1] - read_before[1]) / self.repeats, 4)
        return Timing(
            statistics.median(times),
            _round(peak),
            _round(peak_rss),
            bytes_read,
            read_seconds,
        )


def largest(*values: float | None) -> float | None:
    """The largest of the values that are not None; None if none is."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _round(mb: float | None) -> float | None:
    return None if mb is None else round(mb, 1)


def paired_seconds(
    step: Callable[[], Any], floor: Callable[[], Any], repeats: int, device: torch.device
) -> list[tuple[float, float]]:
    """(floor s, step s) of ``repeats`` back-to-back pairs of runs. A slow spell of a shared
    machine then lands on both halves of a pair, so the median of the pairs' step / floor is
    steadier than the ratio of medians measured minutes apart."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    pairs = []
    for _ in range(repeats):
        f = timed(floor)
        pairs.append((f, timed(step)))
    return pairs


def encode_all(encoder: nn.Module, x: Tensor, batch_size: int, amp: str = "none") -> None:
    """Encode x (n, ...) without gradients, ``batch_size`` patches per call."""
    with torch.inference_mode(), autocast(x.device, amp):
        for start in range(0, len(x), batch_size):
            encoder(x[start : start + batch_size])


def best_batch_size(
    encoder: nn.Module, x: Tensor, device: torch.device, amp: str, candidates: Sequence[int]
) -> tuple[int, dict[int, float]]:
    """The encoder batch size with the highest no-grad throughput over x (n, ...), and the
    patches per second of each size tried (sizes above n are tried only if none fits)."""
    sample = x[: min(len(x), 2 * max(candidates))]
    rates: dict[int, float] = {}
    quick = Meter(device, warmup=1, repeats=1)
    for size in candidates:
        if size > len(sample) and rates:
            break
        rates[size] = len(sample) / quick(encode_all, encoder, sample, size, amp).seconds
    return max(rates, key=rates.__getitem__), rates


def random_target(task: Any, batch_size: int, g: torch.Generator) -> Tensor:
    """A random target of a task for B images: (B,) class ids, (B, classes) 0/1 labels, or
    (B,) 0/1 for a binary task."""
    if task.kind == "multiclass":
        return torch.randint(0, task.num_classes, (batch_size,), generator=g)
    if task.kind == "multilabel":
        return torch.randint(0, 2, (batch_size, task.num_classes), generator=g).float()
    return torch.randint(0, 2, (batch_size,), generator=g).float()


def amp_supported(amp: str, device: torch.device) -> bool:
    """Whether autocast in ``amp`` runs on the device."""
    if amp == "none":
        return True
    if amp == "fp16":
        return device.type == "cuda"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True  # bf16 autocast runs on every CPU; it is fast only where `native_bf16`


class Floors(NamedTuple):
    """The floor measurements of one input.

    records: precision ("none", "bf16", ...) -> its emitted floor record.
    fp32_run: one run of the fp32 floor, for the back-to-back step / floor ratio.
    best_batch: the encoder's fastest no-grad batch size in fp32.
    """

    records: dict[str, dict[str, Any]]
    fp32_run: Callable[[], None]
    best_batch: int


def floor_record(
    amp: str,
    images: int,
    parts: dict[str, Timing],
    best_batch: int,
    rates: dict[int, float],
    **extra: Any,
) -> dict[str, Any]:
    """The record of one floor: its parts' seconds summed (each kept as ``<part>_seconds``),
    the images per second that makes, the largest of their peaks, the encoder's best batch
    size and its patches per second at each size tried, and ``extra`` fields."""
    seconds = sum(t.seconds for t in parts.values())
    timings = parts.values()
    return {
        "measure": "floor",
        "variant": "fp32" if amp == "none" else amp,
        "amp": amp,
        "seconds": round(seconds, 4),
        "images_per_second": round(images / seconds, 3) if seconds > 0 else None,
        "peak_mb": largest(*(t.peak_mb for t in timings)),
        "peak_rss_mb": largest(*(t.peak_rss_mb for t in timings)),
        **extra,
        **{f"{name}_seconds": round(t.seconds, 4) for name, t in parts.items()},
        "best_encoder_batch_size": best_batch,
        "encoder_patches_per_second": {str(k): round(v, 1) for k, v in rates.items()},
    }
