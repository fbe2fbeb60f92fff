"""Writing files so that a reader never sees half of one, and checked downloads (no torch, no
package imports)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import ssl
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ips.errors import InputError, WriteError, one_line

_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}  # a full disk, a size or quota limit
# numpy's tofile (tifffile writes tiles with it) reports a short write without an errno
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class _RecordingFile(io.FileIO):
    """A FileIO that remembers why a write failed: torch.save reports a failed write as a
    RuntimeError of its own, and this is how `atomic_write` still knows the reason."""

    failure: OSError | None = None

    def write(self, data: Any) -> int | None:
        try:
            return super().write(data)
        except OSError as err:
            self.failure = err
            raise

    def truncate(self, size: int | None = None) -> int:
        try:
            return super().truncate(size)
        except OSError as err:
            self.failure = err
            raise


def _open_recording(path: str, mode: str, open_args: dict[str, Any]) -> tuple[_RecordingFile, IO]:
    """``open(path, mode, **open_args)`` for writing, built by hand around a `_RecordingFile`."""
    if "w" not in mode or "a" in mode or "r" in mode or "x" in mode:
        raise ValueError(
            f"atomic_write opens a new file: mode must be 'w', 'wb' or 'w+b', got {mode!r}"
        )
    raw = _RecordingFile(path, "w+" if "+" in mode else "w")
    try:
        buffered = io.BufferedRandom(raw) if "+" in mode else io.BufferedWriter(raw)
        if "b" not in mode:
            return raw, io.TextIOWrapper(buffered, **open_args)  # encoding, errors, newline
        if open_args:
            raise TypeError(f"binary mode takes no text options, got {sorted(open_args)}")
        return raw, buffered
    except BaseException:
        raw.close()
        raise


def _write_failure(
    err: BaseException, raw: _RecordingFile | None, producing: bool
) -> OSError | None:
    """The OSError that made writing fail, when ``err`` comes from one; None for other errors
    (a ValueError of the producer, a slide the producer could not read), which pass unchanged."""
    if isinstance(err, WriteError) or not isinstance(err, Exception):
        return None
    if raw is not None and raw.failure is not None:
        return raw.failure  # whatever the writer raised after, this is why
    if not producing and isinstance(err, OSError):
        return err  # creating, flushing, fsyncing or renaming
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # wrapped by the writer (torch.save)
        seen.add(id(err))
        if isinstance(err, OSError) and (
            err.errno in _WRITE_ERRNOS or _SHORT_WRITE.fullmatch(str(err))
        ):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; when the block ends without an error, flush it
    to disk and rename it over ``path`` (readable by everyone, like an ordinary new file).
    On an error the temporary file is removed and ``path`` is left as it was.

    ``with atomic_write("last.pt") as f: torch.save(payload, f)``

    Args:
        path: the file to write; its folder is made when missing.
        mode: ``"wb"``, ``"w+b"`` (writers that seek and read back: h5py, tifffile) or ``"w"``
            (text; ``open_args`` such as ``encoding`` and ``newline`` go to it).

    Raises:
        WriteError: creating, writing, flushing, fsyncing or renaming failed (a full disk, a
            file-size limit, no permission), also where the writer wraps the OSError in its
            own error; one line naming ``path`` and the reason. Any other error of the block
            passes unchanged.
    """
    path = Path(path)
    tmp: Path | None = None
    raw: _RecordingFile | None = None
    producing = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        os.close(fd)  # reopened by name: writers that need a file name (tifffile) get one
        raw, f = _open_recording(name, mode, open_args)
        with f:
            producing = True
            yield f
            producing = False
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        cause = _write_failure(err, raw, producing)
        if cause is None:
            raise
        kept = "the previous file is kept" if os.path.isfile(path) else "nothing was written"
        reason = cause.strerror or one_line(cause)
        error = WriteError(f"{path}: cannot write it ({reason}); {kept}")
        error.errno = cause.errno  # for callers that test for ENOSPC; the message stays one line
        raise error from err


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` with `atomic_write`; returns ``path``."""
    path = Path(path)
    with atomic_write(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, path: str | os.PathLike, sha256: str, *, timeout: float = 20.0) -> Path:
    """Download ``url`` to ``path`` over HTTPS and check its SHA-256 before it appears.

    Certificates and host names are verified (the system's trust store); plain HTTP, also as
    the target of a redirect, is refused. The bytes go to a temporary file beside ``path``,
    which is renamed only when the checksum matches, so a failed or tampered download leaves
    ``path`` as it was.

    Args:
        url: an ``https://`` address.
        path: where the file goes.
        sha256: the expected hex digest.
        timeout: seconds allowed per network operation.

    Raises:
        ValueError: not HTTPS, or the checksum differs (the message gives both digests).
        OSError: the network failed (``urllib.error.URLError``, ``ssl.SSLError``, timeouts).
    """
    if not url.lower().startswith("https://"):
        raise InputError(f"{url}: refused, downloads must use https://")
    context = ssl.create_default_context()  # CERT_REQUIRED and check_hostname
    request = urllib.request.Request(url, headers={"User-Agent": "iterative-patch-selection"})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        final = response.geturl()
        if not final.lower().startswith("https://"):
            raise InputError(f"{url}: refused, it redirects to {final}, which is not HTTPS")
        digest = hashlib.sha256()
        with atomic_write(path) as f:
            while block := response.read(2**20):
                digest.update(block)
                f.write(block)
            if digest.hexdigest() != sha256.lower():
                raise InputError(
                    f"{url}: checksum mismatch, expected SHA-256 {sha256.lower()}, "
                    f"got {digest.hexdigest()}; the file was not kept"
                )
    return Path(path)
