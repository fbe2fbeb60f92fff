"""What keeps a training run safe on a shared machine: one writer per run folder, a clean stop
on a scheduler's signal, and a name for the sample a dead data loader worker held.

- `RunLock`: ``RUN_DIR/run.lock``, held with ``flock`` for as long as a run writes into the
  folder. The kernel drops the lock when its holder dies (``kill -9``, a lost node), so a dead
  run never keeps a folder; the file only tells the next comer who holds it.
- `StopSignals`: while training, SIGTERM (what Slurm and Kubernetes send before they kill a
  job) and SIGUSR1 (Slurm's ``--signal=USR1@SECONDS`` warning) only set a flag; the loop
  checks it between two steps, writes a checkpoint it can resume from exactly and stops.
- `WorkerSlots`: each data loader worker records which sample it is reading in shared memory,
  so that when one dies (the out-of-memory killer), the error names the sample it held.

This module imports nothing of the package but ``ips.errors``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from ips.errors import InUseError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


# ---- one writer per run folder ------------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``folder/run.lock``; the file holds the holder's pid, host and
    start time for the error a second run gets. The file stays (a lock, not its file, decides).

    ``with RunLock(run_dir): ...`` raises `InUseError` naming the holder when a live process
    holds the folder. On a file system without locks it warns and goes on unlocked.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no flock
            log.warning(
                "%s: no file locks on this system; one run per folder is not enforced",
                self.path.parent,
            )
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise InUseError(
                f"{self.path.parent}: another run is writing into this folder ({holder}); "
                "wait for it to end, or train into another --out"
            ) from None
        except OSError as err:  # e.g. ENOLCK on a network file system without a lock manager
            os.close(fd)
            log.warning(
                "%s: cannot lock (%s); one run per folder is not enforced",
                self.path,
                err.strerror or err,
            )
            return
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"pid {os.getpid()} on host {socket.gethostname()} since {started}\n".encode(), 0
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    return text or "a process that has not written its name yet"


# ---- stopping on a scheduler's signal -----------------------------------------------------------


class StopSignals:
    """While active, the signals in ``names`` set `received` instead of ending the process.

    Handlers can only be installed from the main thread; elsewhere this does nothing (and
    `received` stays None). The previous handlers come back on exit.
    """

    def __init__(self, names: Sequence[str] = STOP_SIGNALS) -> None:
        self.names = tuple(n for n in names if hasattr(signal, n))
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("got %s: stopping after the current step", self.received)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


# ---- which sample a data loader worker held -----------------------------------------------------


class WorkerSlots:
    """Shared memory in which data loader worker k keeps (its pid, the sample it is reading).

    Created in the main process before the loader starts its workers, and carried to them
    inside the dataset (`multiprocessing` shares it when it starts a process).
    """

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self._slots = multiprocessing.get_context().Array("q", [-1] * (2 * num_workers), lock=False)

    @contextlib.contextmanager
    def reading(self, index: int) -> Iterator[None]:
        """Mark sample ``index`` as read by this worker (no-op in the main process)."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is None or info.id >= self.num_workers:
            yield
            return
        self._slots[2 * info.id] = os.getpid()
        self._slots[2 * info.id + 1] = index
        try:
            yield
        finally:
            self._slots[2 * info.id + 1] = -1

    def held(self) -> dict[int, tuple[int, int]]:
        """pid -> (worker id, sample index or -1) of every worker that has started reading."""
        return {
            int(self._slots[2 * k]): (k, int(self._slots[2 * k + 1]))
            for k in range(self.num_workers)
            if self._slots[2 * k] > 0
        }


_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)")
_KILLED_BY = re.compile(r"killed by signal: ([\w ]+)")


def dead_worker(err: BaseException) -> tuple[list[int], str] | None:
    """For the error a DataLoader raises when a worker process died: (its pids, how it died);
    None for any other error."""
    text = str(err)
    if not isinstance(err, RuntimeError) or "DataLoader worker" not in text:
        return None
    if "exited unexpectedly" not in text and "killed by signal" not in text:
        return None
    found = _WORKER_DIED.search(text)
    pids = [int(p) for p in re.findall(r"\d+", found.group(1))] if found else []
    killed = _KILLED_BY.search(text)
    how = f"killed by signal {killed.group(1).strip()}" if killed else "exited unexpectedly"
    return pids, how


def describe_dead_worker(
    err: BaseException, slots: WorkerSlots | None, name_of: Any = None
) -> str | None:
    """One line naming the worker that died, how, and the sample it held; None when ``err``
    is not a dead worker. ``name_of(index)`` gives a sample's name (its file), if known."""
    found = dead_worker(err)
    if found is None:
        return None
    pids, how = found
    held = slots.held() if slots is not None else {}
    parts = []
    for pid in pids or list(held):
        worker, index = held.get(pid, (None, -1))
        who = f"data loader worker {worker} (pid {pid})" if worker is not None else f"pid {pid}"
        if index >= 0:
            name = None
            if name_of is not None:
                with contextlib.suppress(Exception):
                    name = name_of(index)
            what = f"sample {index}" + (f" ({name})" if name else "")
            parts.append(f"{who} {how} while reading {what}")
        else:
            parts.append(f"{who} {how} between samples")
    line = "; ".join(parts) or f"a data loader worker {how}"
    return (
        f"{line} (a worker that dies without an error was most often killed by the "
        "out-of-memory killer: fewer data.num_workers, or smaller images per batch)"
    )
