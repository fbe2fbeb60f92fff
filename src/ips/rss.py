"""Resident memory (RSS) of this process, in MiB: now, its high-water mark, and a resettable one.

The memory and speed benchmarks measure a step as "peak during the step minus resident memory
before it". On Linux the kernel's high-water mark can be reset just before the step
(`reset_peak_rss`) and read after it (`peak_rss_since_reset_mb`); elsewhere only the mark since
the process started (`max_rss_mb`) is known.
"""

from __future__ import annotations

import ctypes
import os
import sys


def rss_mb() -> float:
    """Resident memory now, MiB (Linux `/proc/self/statm`); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def max_rss_mb(*, children: bool = False) -> float:
    """The high-water mark since the process started (`ru_maxrss`), MiB.

    Args:
        children: return the larger of this process's mark and that of its largest finished
            child (e.g. data loader workers).
    """
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if children:
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB else


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_mb() -> float:
    """High-water mark since the last `reset_peak_rss` (`VmHWM`), MiB.

    Raises:
        OSError: /proc/self/status is missing or has no VmHWM line (not Linux).
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    raise OSError("no VmHWM in /proc/self/status")


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so that the next resident high-water
    mark counts what the next operation allocates, not memory an earlier one left cached."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
