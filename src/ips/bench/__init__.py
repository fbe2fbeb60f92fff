"""Measurements of IPS: peak memory against N (`memory`) and speed against the compute floor
(`speed`), both on top of one resident-memory helper (`ips.rss`), and feature extraction
against its decode and encode floors (`ips.bench.extraction`, imported from there).

The speed names are imported on first use (`__getattr__` below): `ips.bench.speed` pulls in
`ips.train` (about 160 MiB of imports), and every memory measurement runs in a fresh process
that imports this package, so importing it eagerly would raise the whole-process peak that
`bench_memory` reports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ips.bench.memory import (
    DEFAULT_NUM_PATCHES,
    MEMORY_KEYS,
    METHODS,
    FeatureFile,  # the reader of feature rows the memory benchmark uses (ips.data.feature_bags)
    MemoryCase,
    bench_memory,
    measure_memory,
    memory_table,
    plot_memory,
    run_memory_case,
    slide_grid,
    write_features,
)
from ips.rss import (
    max_rss_mb,
    peak_rss_since_reset_mb,
    release_free_heap,
    reset_peak_rss,
    rss_mb,
)

if TYPE_CHECKING:
    from ips.bench.speed import (
        DEFAULT_VARIANTS,
        FEATURE_VARIANTS,
        SPEED_KEYS,
        VARIANTS,
        SpeedBatch,
        bench_speed,
        make_speed_batch,
        speed_table,
        training_step,
    )

_SPEED_NAMES = (  # imported from ips.bench.speed on first use
    "DEFAULT_VARIANTS",
    "FEATURE_VARIANTS",
    "SPEED_KEYS",
    "VARIANTS",
    "SpeedBatch",
    "bench_speed",
    "make_speed_batch",
    "speed_table",
    "training_step",
)

__all__ = [
    "DEFAULT_NUM_PATCHES",
    "DEFAULT_VARIANTS",
    "FEATURE_VARIANTS",
    "MEMORY_KEYS",
    "METHODS",
    "SPEED_KEYS",
    "VARIANTS",
    "FeatureFile",
    "MemoryCase",
    "SpeedBatch",
    "bench_memory",
    "bench_speed",
    "make_speed_batch",
    "max_rss_mb",
    "measure_memory",
    "memory_table",
    "peak_rss_since_reset_mb",
    "plot_memory",
    "release_free_heap",
    "reset_peak_rss",
    "rss_mb",
    "run_memory_case",
    "slide_grid",
    "speed_table",
    "training_step",
    "write_features",
]


def __getattr__(name: str) -> Any:
    if name in _SPEED_NAMES:
        return getattr(importlib.import_module("ips.bench.speed"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SPEED_NAMES))
