"""MNIST digits from a user path, the user cache, a download, or scikit-learn's small digits.

`load_mnist` tries, in order:

1. ``path`` (or ``$IPS_MNIST``): a folder with the four standard idx files, or an ``.npz``;
2. ``mnist.npz`` in the user cache (``cache_dir``, ``$IPS_CACHE`` or ``~/.cache/ips``);
3. a download into the cache (when ``download`` is true): HTTPS, SHA-256 checked;
4. scikit-learn's bundled 8 x 8 digits, upscaled to 28 x 28 (with a warning: not MNIST).

Accepted layouts for a given path::

    mnist/                               mnist.npz
    ├── train-images-idx3-ubyte[.gz]     ├── x (70000, 28, 28) uint8  rows 0..59999: train split
    ├── train-labels-idx1-ubyte[.gz]     └── y (70000,)                rows 60000..: test split
    ├── t10k-images-idx3-ubyte[.gz]      or
    └── t10k-labels-idx1-ubyte[.gz]      x_train (n, 28, 28), y_train (n,), x_test, y_test

The idx files may also sit in ``MNIST/raw/`` below the folder (torchvision's layout).
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ips.errors import InputError, MissingExtraError, MissingFileError
from ips.files import atomic_write, download, sha256_of

log = logging.getLogger(__name__)

IMAGE_SIZE = 28  # MNIST digits are 28 x 28
NUM_CLASSES = 10
NUM_TRAIN = 60_000  # rows of the official training split in the 70000-row `x, y` layout
NUM_TOTAL = 70_000
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {3: 2051, 1: 2049}  # number of dimensions -> magic number of an idx file of uint8
_DOWNLOAD_TIMEOUT_S = 20.0  # per network operation, so a blocked network fails quickly
MNIST_MIRRORS = (  # HTTPS only
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's
)
MNIST_SHA256 = {  # the files as LeCun and Cortes distribute them
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}


@dataclass(frozen=True, eq=False)
class MnistDigits:
    """The two official MNIST splits (or a stand-in, see `source`)."""

    train_images: np.ndarray  # (n, 28, 28) uint8, 0..255
    train_labels: np.ndarray  # (n,) int64, 0..9
    test_images: np.ndarray  # (m, 28, 28) uint8, 0..255
    test_labels: np.ndarray  # (m,) int64, 0..9
    source: str  # human-readable: where the digits came from

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            where = f"{split} split of {self.source}"
            if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
                raise InputError(
                    f"{where}: images must be uint8 (n, 28, 28), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != np.int64 or labels.shape != (len(images),):
                raise InputError(
                    f"{where}: labels must be int64 ({len(images)},), "
                    f"got {labels.dtype} {tuple(labels.shape)}"
                )
            if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
                raise InputError(
                    f"{where}: labels must lie in 0..9, got {labels.min()}..{labels.max()}"
                )


def load_mnist(
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> MnistDigits:
    """Load MNIST, from the first of: path, $IPS_MNIST, the cache, a download, scikit-learn.

    Args:
        path: folder of idx files or an ``.npz`` (layouts in the module docstring). Defaults to
            ``$IPS_MNIST``. A given path must exist and hold MNIST; there is no fallback then.
        cache_dir: where ``mnist.npz`` is cached and downloads go. Defaults to ``$IPS_CACHE``,
            else ``~/.cache/ips``.
        download: download MNIST (HTTPS, SHA-256 checked) when nothing is found locally.

    Returns:
        MnistDigits with images (n, 28, 28) uint8 and labels (n,) int64 per split.
    """
    if path is None:
        path = os.environ.get("IPS_MNIST") or None
    if path is not None:
        return _load_path(Path(path).expanduser())

    cache = _cache_dir(cache_dir)
    cached = cache / "mnist.npz"
    if cached.is_file():
        return _load_npz(cached)
    if download:
        digits = _download(cache)
        if digits is not None:
            return digits
    return _sklearn_digits()


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        cache_dir = os.environ.get("IPS_CACHE") or Path.home() / ".cache" / "ips"
    return Path(cache_dir).expanduser()


def _load_path(path: Path) -> MnistDigits:
    if not path.exists():
        raise MissingFileError(
            f"MNIST path {path} does not exist; expected a folder of idx files or an .npz file"
        )
    if path.is_dir():
        return _load_idx_dir(path)
    if path.suffix == ".npz":
        return _load_npz(path)
    raise InputError(f"MNIST path {path} must be a folder of idx files or an .npz file")


def _load_npz(path: Path) -> MnistDigits:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read MNIST file {path}: {error}") from error
    keys = set(arrays)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        x_train, y_train = arrays["x_train"], arrays["y_train"]
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    elif {"x", "y"} <= keys:
        x, y = arrays["x"], arrays["y"]
        if len(x) != NUM_TOTAL or len(y) != NUM_TOTAL:
            raise InputError(
                f"MNIST file {path}: arrays x, y must have {NUM_TOTAL} rows "
                f"(60000 train then 10000 test), got {len(x)} and {len(y)}"
            )
        x_train, y_train, x_test, y_test = (
            x[:NUM_TRAIN],
            y[:NUM_TRAIN],
            x[NUM_TRAIN:],
            y[NUM_TRAIN:],
        )
    else:
        raise InputError(
            f"MNIST file {path} must hold arrays x, y or x_train, y_train, x_test, y_test; "
            f"got {sorted(keys)}"
        )
    return _from_arrays(x_train, y_train, x_test, y_test, source=f"MNIST file {path}")


def _load_idx_dir(folder: Path) -> MnistDigits:
    for candidate in (folder, folder / "MNIST" / "raw", folder / "raw"):
        files = {key: _find_idx(candidate, name) for key, name in IDX_FILES.items()}
        if all(file is not None for file in files.values()):
            arrays = {key: _read_idx(file) for key, file in files.items()}
            return _from_arrays(
                arrays["train_images"],
                arrays["train_labels"],
                arrays["test_images"],
                arrays["test_labels"],
                source=f"MNIST idx files in {candidate}",
            )
    raise MissingFileError(
        f"MNIST folder {folder} lacks the idx files {', '.join(IDX_FILES.values())} "
        "(each may end in .gz, also looked in MNIST/raw/)"
    )


def _find_idx(folder: Path, name: str) -> Path | None:
    for file in (folder / name, folder / f"{name}.gz"):
        if file.is_file():
            return file
    return None


def _read_idx(file: Path) -> np.ndarray:
    """Read an idx file of uint8 values (MNIST's format), plain or gzipped."""
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rb") as stream:
        data = stream.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if ndim not in _IDX_MAGIC or magic != _IDX_MAGIC[ndim]:
        raise InputError(f"MNIST idx file {file}: expected magic 2049 or 2051, got {magic}")
    shape = tuple(int.from_bytes(data[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise InputError(
            f"MNIST idx file {file}: header says shape {shape}, "
            f"but {len(data) - offset} values follow"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _from_arrays(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    source: str,
) -> MnistDigits:
    """Check dtypes before the lossless cast of labels to int64."""
    for name, labels in (("y_train", y_train), ("y_test", y_test)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{source}: labels {name} must be integers, got {labels.dtype}")
    return MnistDigits(
        train_images=np.ascontiguousarray(x_train),
        train_labels=y_train.astype(np.int64),
        test_images=np.ascontiguousarray(x_test),
        test_labels=y_test.astype(np.int64),
        source=source,
    )


def _download(cache: Path) -> MnistDigits | None:
    """Download the four idx files into ``cache/MNIST/raw`` and save ``mnist.npz``; None when
    that fails.

    Every file comes over HTTPS with certificates checked and must match its SHA-256
    (`MNIST_SHA256`) before it is kept; a file already there is checked the same way. (Not
    torchvision's MNIST class: it verifies MD5 sums, but keeps a plain-HTTP mirror and retries
    a failed HTTPS download over HTTP.)
    """
    raw = cache / "MNIST" / "raw"
    log.info("downloading MNIST to %s", raw)
    try:
        for name, sha256 in MNIST_SHA256.items():
            target = raw / name
            if target.is_file() and sha256_of(target) == sha256:
                continue
            errors = []
            for mirror in MNIST_MIRRORS:
                try:
                    download(mirror + name, target, sha256, timeout=_DOWNLOAD_TIMEOUT_S)
                    break
                except (OSError, ValueError) as error:  # network, TLS, checksum
                    errors.append(" ".join(str(error).split()) or type(error).__name__)
            else:
                raise OSError("; ".join(errors))
        digits = _load_idx_dir(raw)
    except (OSError, ValueError) as error:
        level = logging.WARNING if "checksum" in str(error) else logging.DEBUG
        log.log(level, "MNIST download failed: %s", error)
        return None

    try:
        _save_npz(cache / "mnist.npz", digits)
    except OSError as error:
        log.debug("could not cache MNIST in %s: %s", cache, error)
    return digits


def _save_npz(file: str | os.PathLike, digits: MnistDigits) -> Path:
    """Write digits as an ``.npz`` with x_train, y_train, x_test, y_test (atomically)."""
    file = Path(file)
    with atomic_write(file) as stream:
        np.savez_compressed(
            stream,
            x_train=digits.train_images,
            y_train=digits.train_labels,
            x_test=digits.test_images,
            y_test=digits.test_labels,
        )
    return file


def _sklearn_digits() -> MnistDigits:
    """scikit-learn's 1797 8 x 8 digits, upscaled to 20 x 20 and centred in 28 x 28 like MNIST."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise MissingExtraError(
            "MNIST was not found and the fallback digits need: pip install scikit-learn"
        ) from error
    from PIL import Image

    log.warning(
        "real MNIST not found; using scikit-learn's 8x8 digits upscaled to 28x28 instead "
        "(point to MNIST with --mnist PATH or $IPS_MNIST)"
    )
    bunch = load_digits()
    small = bunch.images.astype(np.float32)  # (n, 8, 8), 0..16
    margin = (IMAGE_SIZE - 20) // 2
    images = np.zeros((len(small), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, digit in enumerate(small):
        big = np.asarray(Image.fromarray(digit).resize((20, 20), Image.Resampling.BILINEAR))
        pixels = np.clip(np.rint(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        images[i, margin : margin + 20, margin : margin + 20] = pixels
    labels = bunch.target.astype(np.int64)
    is_test = np.arange(len(images)) % 5 == 0  # every 5th digit goes to the test split
    return MnistDigits(
        train_images=images[~is_test],
        train_labels=labels[~is_test],
        test_images=images[is_test],
        test_labels=labels[is_test],
        source="scikit-learn 8x8 digits upscaled to 28x28 (not MNIST)",
    )
