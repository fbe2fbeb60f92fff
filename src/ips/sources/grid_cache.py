"""A cache of patch grids: which patches of a file pass its tissue filter, computed once.

Tissue detection reads a thumbnail of the whole image (Otsu) or rasterises a mask, seconds
per slide. A dataset opens its files again in every epoch and in every `DataLoader` worker,
so `GridCache` keeps the kept patch ids by a key of the file's identity (resolved path, size,
modification time), the reader, the resolution, the grid (P, stride) and the tissue filter
(Otsu, or the mask file's identity, and ``min_tissue``): in memory, and as small ``.npz``
files in a folder, which worker processes and later runs share. A changed file or a changed
grid gives another key; nothing needs clearing by hand.

Files are written atomically (`ips.files.atomic_write`), so concurrent workers that compute the
same grid both write a whole file and either wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ips.files import atomic_write

from .tissue import EmptyTissueError

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # part of every key: bump when the ids computed for a key could change
MEMORY_BYTES = 64 * 2**20  # kept ids held in memory per process, least recently used dropped


def default_cache_dir() -> Path:
    """``$IPS_CACHE_DIR/grids``, else ``$XDG_CACHE_HOME/ips/grids``, else ``~/.cache/ips/grids``."""
    root = os.environ.get("IPS_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "grids"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ips" / "grids"


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a file's content cheaply: resolved path, size, modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class GridCache:
    """Kept patch ids by grid key, in memory and (unless ``folder`` is None) on disk.

    Args:
        folder: where the ``.npz`` files go (created on the first write); None: memory only.
        memory_bytes: bytes of ids held in memory.
    """

    def __init__(self, folder: str | os.PathLike | None, *, memory_bytes: int = MEMORY_BYTES):
        self.folder = None if folder is None else Path(folder).expanduser()
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._warned = False

    @staticmethod
    def digest(key: Mapping[str, Any]) -> str:
        """The key's name: SHA-256 of its sorted JSON."""
        text = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def ids(self, key: Mapping[str, Any], compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The kept ids of ``key``, from the cache or from ``compute()`` (then stored).

        An `EmptyTissueError` from ``compute`` is stored too and raised again on every later
        call, so a slide without tissue costs its thumbnail once.
        """
        name = self.digest(key)
        found = self._lookup(name)
        if found is None:
            try:
                found = (np.asarray(compute(), dtype=np.int64), "")
            except EmptyTissueError as err:
                found = (np.zeros(0, dtype=np.int64), str(err))
            self._store(name, *found)
        ids, error = found
        if error:
            raise EmptyTissueError(error)
        return ids

    def _lookup(self, name: str) -> tuple[np.ndarray, str] | None:
        with self._lock:
            if name in self._memory:
                self._memory.move_to_end(name)
                return self._memory[name]
        if self.folder is None:
            return None
        path = self.folder / f"{name}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                found = (np.asarray(data["ids"], dtype=np.int64), str(data["error"]))
        except FileNotFoundError:
            return None
        except Exception as err:  # a damaged entry: computed again and rewritten
            log.debug("grid cache entry %s unreadable (%s)", path, err)
            return None
        self._remember(name, *found)
        return found

    def _store(self, name: str, ids: np.ndarray, error: str) -> None:
        self._remember(name, ids, error)
        if self.folder is None:
            return
        try:
            with atomic_write(self.folder / f"{name}.npz") as fh:
                np.savez(fh, ids=ids, error=np.array(error))
        except OSError as err:  # a read-only or full disk: the grids are computed again later
            if not self._warned:
                log.warning("grid cache: cannot write into %s (%s)", self.folder, err)
                self._warned = True

    def _remember(self, name: str, ids: np.ndarray, error: str) -> None:
        with self._lock:
            if name in self._memory:
                return
            self._memory[name] = (ids, error)
            self._nbytes += ids.nbytes
            while self._nbytes > self.memory_bytes and len(self._memory) > 1:
                _, (old, _) = self._memory.popitem(last=False)
                self._nbytes -= old.nbytes

    def __getstate__(self) -> dict[str, Any]:  # worker processes start with an empty memory
        return {"folder": self.folder, "memory_bytes": self.memory_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"], memory_bytes=state["memory_bytes"])

    def __repr__(self) -> str:
        return f"GridCache({str(self.folder) if self.folder else None!r})"
