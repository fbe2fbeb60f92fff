"""Writing files so that a reader never sees half of one, and checked downloads (no torch, no
package imports)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ips.errors import InputError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; when the block ends without an error, flush it
    to disk and rename it over ``path`` (readable by everyone, like an ordinary new file).
    On an error the temporary file is removed and ``path`` is left as it was.

    ``with atomic_write("last.pt") as f: torch.save(payload, f)``
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)  # reopened by name: writers that need a file name (tifffile) get one
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
