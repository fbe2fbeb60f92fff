"""Feature bags: the precomputed features of one image's patches, read lazily.

One file per slide, as ``ips extract-features`` writes it::

    tumor_001.h5
    ├── features (N, F) float32   one row per tissue tile, stored contiguously
    ├── coords (N, 2) int64       level-0 (x, y) of each tile's top-left corner
    └── attributes                patch_size (P, pixels at the read resolution), downsample
                                  (level-0 pixels per read pixel), level, mpp, encoder,
                                  feature_dim, ips_version, ... (see ``ips.features``)

``.npz`` files with the same two arrays (and optionally ``patch_size``, level-0 pixels) are
read too, loaded whole: numpy reads (and decompresses) a zip member in one piece, it cannot be
memory-mapped. ``.npy`` files holding the features alone (no coords) are memory-mapped, so a
read pages in only the rows it asks for.

`FeatureBag` is a patch container for selection: ``len(bag)`` = N, ``bag.read(ids)`` ->
float32 (n, F), ``bag.positions(ids)``. An HDF5 bag reads only the requested rows, opens its
file on the first read in each process and pickles without its handle, so bags can be made in
`DataLoader` workers and read in the main process.

Bags come from elsewhere, so they are checked as data, each problem an InputError naming the
file and the dataset: on opening, the shapes and dtypes (``features`` (N, F) numbers with
N, F >= 1; ``coords`` (N, 2) numbers), the tile-size attributes, and that neither dataset is
an HDF5 link, external or virtual dataset (which would read other files); the coords' values
(finite; rounded to whole pixels) when they are first used; the features' values
(finite) in every read, since a bag is never read whole. Coords are optional (``.npy``) until
something needs them: 2-D positional encodings name the bag that has none.

`FeatureBagDataset` serves labelled bags to training; the ``feature_bags`` dataset reads the
labels from a CSV file. `FeatureFile` reads rows of a plain ``.npy`` file with file reads, no
memory map, so rows once read do not stay resident (used by the memory benchmark).
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ips.config import TaskSpec
from ips.errors import InputError, MissingExtraError, MissingFileError

log = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".h5", ".hdf5", ".npz", ".npy")  # feature bags, in order of preference
H5PY_HINT = "reading .h5 feature bags needs: pip install 'iterative-patch-selection[features]'"


def import_h5py() -> Any:
    """Import h5py, or raise an ImportError naming the extra that installs it."""
    try:
        import h5py
    except ImportError as err:
        raise MissingExtraError(H5PY_HINT) from err
    return h5py


# ---- one bag ----------------------------------------------------------------------------------


class FeatureBag:
    """Precomputed features of one image's patches, in the container protocol of selection.

    Reads of consecutive patches are one contiguous read (a slice), and selection reads a
    bag that way (``sequential_reads``): it encodes the rows in storage order, in blocks of
    its chunk size, and visits its random order over their logits (`ips.selection`).

    Args:
        features: (N, F) numbers.
        coords: (N, 2) level-0 (x, y) top-left corners, or None when unknown.
        patch_size: patch side in level-0 pixels; default the grid step of the coords.
        name: used in error messages (the file name for bags read from disk).
        attrs: metadata of the bag (extraction settings).

    Attributes:
        coords: (N, 2) int64, or None.
        patch_size_level0: patch side in level-0 pixels.
        level0_size: (width, height) spanned by the patches.
    """

    sequential_reads = True  # consecutive rows are read far faster than scattered ones

    def __init__(
        self,
        features: np.ndarray,
        coords: np.ndarray | None = None,
        *,
        patch_size: float | None = None,
        name: str = "bag",
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.attrs = dict(attrs or {})
        self._features = np.asarray(features)
        self._shape = _check_shape(name, self._features.shape, self._features.dtype)
        self._coords = None if coords is None else _check_coords(name, coords, self._shape[0])
        self._patch_size = patch_size

    # ---- size and layout --------------------------------------------------------------------
    def __len__(self) -> int:
        return self._shape[0]

    @property
    def feature_dim(self) -> int:
        """F, the width of a feature vector."""
        return self._shape[1]

    @property
    def coords(self) -> np.ndarray | None:
        """(N, 2) int64 level-0 (x, y) of the patches' top-left corners, or None."""
        return self._coords

    @functools.cached_property
    def _step(self) -> float | None:
        return _grid_step(self.coords)

    @functools.cached_property
    def patch_size_level0(self) -> float:
        """Patch side in level-0 pixels (stored, else the grid step of the coords, else 1)."""
        return float(self._patch_size or self._step or 1.0)

    @functools.cached_property
    def level0_size(self) -> tuple[int, int]:
        """(width, height) in level-0 pixels spanned by the patches."""
        coords = self.coords
        if coords is None:
            return (1, 1)
        far = coords.max(0) + self.patch_size_level0
        return max(1, math.ceil(far[0])), max(1, math.ceil(far[1]))

    # ---- reading ----------------------------------------------------------------------------
    def read(self, ids: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Features of patches.

        Args:
            ids: (n,) ints in [0, N).
            out: a C-order float32 (n', F) array, n' >= n, that consecutive rows may be read
                into (a caller reading block after block reuses one buffer; the rows come
                back as a view of it); other reads ignore it.

        Returns:
            float32 (n, F).
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        bad = (ids < 0) | (ids >= len(self))
        if bad.any():
            raise IndexError(
                f"{self.name}: patch ids must be in [0, {len(self)}), got {ids[bad][0]}"
            )
        if len(ids) > 1 and _consecutive(ids):
            run = slice(int(ids[0]), int(ids[-1]) + 1)
            into = None if out is None else self._rows_into(run, out)
            rows = into if into is not None else np.asarray(self._rows(run), np.float32)
        elif self._reads_any_order():
            rows = np.asarray(self._rows(ids), dtype=np.float32)
        else:  # increasing rows, each read once
            unique, inverse = np.unique(ids, return_inverse=True)
            rows = np.asarray(self._rows(unique), dtype=np.float32)[inverse]
        # the float32 sum of all rows is finite only if every value is (one cheap pass); if
        # it is not, a float64 row sum is finite exactly when every float32 of the row is (a
        # float32 sum may also overflow)
        if (
            not _sum_is_finite(rows)
            and not np.isfinite(np.add.reduce(rows, axis=1, dtype=np.float64)).all()
        ):
            finite = np.isfinite(rows).all(axis=1)
            bad = np.unique(ids[~finite])
            first, more = int(bad[0]), len(bad) - 1
            also = f", and {more} more of the rows read" if more else ""
            raise InputError(
                f"{self.name}: features hold NaN or inf (patch {first}{also}); expected finite "
                "numbers: re-extract this bag"
            )
        return rows

    def will_read(self, ids: Sequence[int] | np.ndarray) -> None:
        """A hint that patches ``ids`` (n,) are read next: bags on disk ask the operating
        system to read their rows ahead (consecutive rows of a contiguous block); a no-op
        otherwise."""
        span = self._file_span(np.asarray(ids, dtype=np.int64).reshape(-1))
        if span is not None and hasattr(os, "posix_fadvise"):
            path, start, length = span
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except OSError:  # only a hint: the read itself reports a missing file
                pass

    def _file_span(self, ids: np.ndarray) -> tuple[Path, int, int] | None:
        """(file, byte offset, byte length) of rows ids (n,) if they are consecutive rows of
        a block stored contiguously in a file; else None."""
        return None

    def _rows_into(self, rows: slice, out: np.ndarray) -> np.ndarray | None:
        """Consecutive rows read into the first rows of ``out`` (float32 (n', F)), returned as
        a view of it; None where this bag cannot (then `_rows` reads them)."""
        return None

    def _rows(self, ids: np.ndarray | slice) -> np.ndarray:
        """Rows `ids` as stored, a new array: a slice of consecutive rows, or ids in any order
        where `_reads_any_order`, else increasing and unique ones."""
        return _own(self._features[ids], ids)

    def _reads_any_order(self) -> bool:
        """Whether `_rows` takes ids in any order, repeats included (arrays in memory and
        memory maps), so that nothing needs sorting first."""
        return True

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(row, col) on the grid of the coords. Args: ids: (n,). Returns: (n, 2) int64."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        coords = self.coords
        if coords is None:
            raise InputError(
                f"{self.name}: grid positions (model.pos_enc '2d') need 'coords' (N, 2), and "
                "this bag has none (a .npy bag); use an .h5 or .npz bag with coords"
            )
        step = self._step or self.patch_size_level0
        return np.rint(coords[ids][:, ::-1] / step).astype(np.int64)

    def close(self) -> None:
        """Release file handles (the next read reopens them)."""

    def __enter__(self) -> FeatureBag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, N={len(self)}, F={self.feature_dim})"


class H5FeatureBag(FeatureBag):
    """A feature bag in an HDF5 file, read row by row.

    Construction reads only the shapes and attributes; coords are read on first use; the file
    is opened on the first read in each process (never shared across a fork) and pickles
    without its handle.

    Features stored as one contiguous, uncompressed block (the layout ``ips extract-features``
    writes) are read without h5py: consecutive rows (what selection reads) with one positioned
    read of their bytes into a new array, scattered rows through a memory map of the block,
    opened for each read and closed after it. Neither leaves the rows read resident; the map
    gives 2.6x the random rows per second of h5py's own reads, and the positioned read is one
    copy of the bytes, with no map to set up and tear down. h5py's reads remain for every
    other layout (benchmarks/features_speed.md).

    Args:
        path: the ``.h5`` / ``.hdf5`` file with ``features`` (N, F) and ``coords`` (N, 2).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = self.path.name
        h5py = import_h5py()
        if not self.path.is_file():
            raise MissingFileError(f"{self.path}: no such file")
        try:
            handle = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(f"{self.path}: cannot read as HDF5 ({_one_line(err)})") from None
        with handle:
            features, coords = _bag_arrays(self.path, handle)
            self._shape = _check_shape(str(self.path), features.shape, features.dtype)
            _check_coords_layout(str(self.path), coords.shape, coords.dtype, self._shape[0])
            self._patch_size = tile_size_level0(handle)
            self.attrs = {key: _plain(value) for key, value in handle.attrs.items()}
            self._offset = _contiguous_offset(features, self.path)
            self._dtype = features.dtype
        self._handle: Any = None
        self._pid: int | None = None

    @functools.cached_property
    def _coords(self) -> np.ndarray:  # type: ignore[override]
        return _check_coords(str(self.path), self._file()["coords"][()], self._shape[0])

    def _file(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            h5py = import_h5py()
            self._handle, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._handle

    def _reads_any_order(self) -> bool:
        return self._offset is not None  # h5py reads increasing ids

    def _file_span(self, ids: np.ndarray) -> tuple[Path, int, int] | None:
        return _span(self.path, self._offset, self._dtype.itemsize * self._shape[1], ids)

    def _rows_into(self, rows: slice, out: np.ndarray) -> np.ndarray | None:
        start, stop, _ = rows.indices(self._shape[0])
        fits = out.dtype == np.float32 and out.flags.c_contiguous and out.ndim == 2
        fits = fits and out.shape[1] == self._shape[1] and out.shape[0] >= stop - start
        if self._offset is None or self._dtype != np.float32 or not fits:
            return None
        try:
            return read_block(self.path, self._offset, self._dtype, self._shape, rows, out=out)
        except OSError as err:
            raise self._read_failed(err) from None

    def _rows(self, ids: np.ndarray | slice) -> np.ndarray:
        try:
            if self._offset is not None and isinstance(ids, slice):
                return read_block(self.path, self._offset, self._dtype, self._shape, ids)
            if self._offset is not None:
                block = np.memmap(
                    self.path, dtype=self._dtype, mode="r", offset=self._offset, shape=self._shape
                )
                rows = _own(block[ids], ids)  # the map closes with `block`
                del block
                return rows
            return self._file()["features"][ids]
        except ValueError as err:  # a map past the end: the file shrank since it was opened
            raise OSError(f"{self.path}: cannot read rows of 'features' ({err})") from None
        except OSError as err:  # an OSError still: training's data.on_error: skip catches it
            raise self._read_failed(err) from None

    def _read_failed(self, err: OSError) -> OSError:
        """The error of a failed read of rows, naming the file."""
        return OSError(f"{self.path}: cannot read rows of 'features' ({_one_line(err)})")

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": None}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may be gone already
            pass


class NpyFeatureBag(FeatureBag):
    """The features alone (no coords) of a ``.npy`` file, memory-mapped read-only.

    A read pages in only the rows it asks for; the file is never loaded whole. Pages once read
    count as resident memory of the process until the kernel reclaims them (they are clean and
    backed by the file). Pickles without its map: each process maps the file itself.

    Args:
        path: the ``.npy`` file with features (N, F).
        mapped: its array, already mapped (default: mapped here).
    """

    def __init__(self, path: str | os.PathLike, mapped: np.memmap | None = None) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.attrs = {}
        self._map: np.memmap | None = _map_npy(self.path) if mapped is None else mapped
        self._shape = _check_shape(str(self.path), self._map.shape, self._map.dtype)
        self._coords = None
        self._patch_size = None

    def _rows(self, ids: np.ndarray | slice) -> np.ndarray:
        if self._map is None:
            self._map = _map_npy(self.path)
        return _own(self._map[ids], ids)

    def _file_span(self, ids: np.ndarray) -> tuple[Path, int, int] | None:
        mapped = self._map
        if mapped is None or not mapped.flags.c_contiguous:
            return None
        return _span(self.path, mapped.offset, mapped.dtype.itemsize * self._shape[1], ids)

    def close(self) -> None:
        self._map = None  # unmapped once no row read from it is referenced

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_map": None}


def _sum_is_finite(rows: np.ndarray) -> bool:
    """Whether the float32 sum of all values of rows (n, F) is finite: false if any value is
    NaN or inf (or if the sum overflows). torch sums a freshly read 10 MB block in a fifth of
    numpy's time on 2 cores (0.08 against 0.43 ms)."""
    if rows.flags.writeable and rows.flags.c_contiguous:  # torch takes writeable arrays only
        return math.isfinite(float(torch.from_numpy(rows).sum()))
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(rows.reshape(-1).sum()))


def _consecutive(ids: np.ndarray) -> bool:
    """Whether ids (n,) are consecutive increasing rows: one contiguous run of a bag."""
    return bool(ids[-1] - ids[0] == len(ids) - 1 and (np.diff(ids) == 1).all())


def _span(
    path: Path, offset: int | None, row_bytes: int, ids: np.ndarray
) -> tuple[Path, int, int] | None:
    """(path, byte offset, byte length) of consecutive rows ids (n,) of a block of rows of
    ``row_bytes`` each at byte ``offset`` of a file; None for other ids or no such block."""
    if offset is None or len(ids) == 0 or not _consecutive(ids):
        return None
    return path, offset + int(ids[0]) * row_bytes, len(ids) * row_bytes


def read_block(
    path: Path,
    offset: int,
    dtype: np.dtype,
    shape: tuple[int, int],
    rows: slice,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rows ``rows`` of a C-order (N, F) array stored at byte ``offset`` of a file, read with
    positioned reads (nothing mapped, nothing left resident) into a new array, or into the
    first rows of ``out`` (C-order, of ``dtype`` and width F), returned as a view of it.

    Raises:
        OSError: the file ends before the last row asked for.
    """
    start, stop, _ = rows.indices(shape[0])
    count = max(0, stop - start)
    out = np.empty((count, shape[1]), dtype=dtype) if out is None else out[:count]
    view = memoryview(out).cast("B")
    with open(path, "rb", buffering=0) as f:
        f.seek(offset + start * shape[1] * dtype.itemsize)
        done = 0
        while done < len(view):  # a read may return fewer bytes than asked
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"the file ends before row {stop} of {shape[0]}")
            done += got
    return out


def _own(rows: np.ndarray, ids: np.ndarray | slice) -> np.ndarray:
    """Rows read with ``ids`` as an array of their own: a slice reads a view, copied here;
    integer ids already read a copy."""
    return np.array(rows) if isinstance(ids, slice) else rows


def _map_npy(path: Path) -> np.memmap:
    """The array of a ``.npy`` file, memory-mapped read-only."""
    try:
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except NUMPY_ERRORS as err:
        raise _cannot_load(path, err) from None
    if not isinstance(mapped, np.memmap):
        raise InputError(f"{path}: expected a .npy file of features (N, F), got a .npz archive")
    return mapped


def open_feature_bag(path: str | os.PathLike) -> FeatureBag:
    """Open a feature bag: ``.h5``/``.hdf5`` (lazy) or ``.npz`` with ``features`` (N, F) and
    ``coords`` (N, 2) level-0 (x, y), optionally ``patch_size`` (level-0 pixels); ``.npy`` with
    the features only (memory-mapped; then the patches have no coords)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return H5FeatureBag(path)
    try:  # a .npy file is mapped (nothing read yet); a .npz archive is opened
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except NUMPY_ERRORS as err:
        raise _cannot_load(path, err) from None
    if isinstance(data, np.memmap):  # .npy: the features alone
        bag = NpyFeatureBag(path, data)
        log.warning("%s: a .npy bag has no coords; no heatmap or GeoJSON for it", path)
        return bag
    with data:
        try:  # members are read (and decompressed) only now
            features, coords = _bag_arrays(path, data)
            size = data["patch_size"] if "patch_size" in data.files else None
        except InputError:  # names the file already
            raise
        except NUMPY_ERRORS as err:
            raise _cannot_load(path, err) from None
        size = None if size is None else _positive_number(str(path), "patch_size", size)
        return FeatureBag(features, coords, patch_size=size, name=path.name)


# what np.load raises on a file that is not a numpy file, or a damaged one (MemoryError: a
# header that asks for more than there is)
NUMPY_ERRORS = (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile, zlib.error)


def _cannot_load(path: Path, err: BaseException) -> InputError:
    if isinstance(err, MemoryError):
        reason = "its header asks for more memory than there is"
    elif _holds_objects(path):  # what numpy says then is about memory maps
        reason = "it holds Python objects, which only pickle could load, and pickle is refused"
    else:
        reason = _one_line(err)
    return InputError(f"{path}: cannot read as a numpy file ({reason})")


def _holds_objects(path: Path) -> bool:
    """Whether a ``.npy`` file's header declares Python objects (False if it has none)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            _, _, dtype = _HEADER_READERS[version](fh)
        return bool(dtype.hasobject)
    except (KeyError, *NUMPY_ERRORS):
        return False


def find_bag(folder: str | os.PathLike, name: str) -> Path | None:
    """The bag of the image called `name` in `folder` (``name.h5``, ``.hdf5``, ``.npz`` or
    ``.npy``, in that order), or None."""
    for suffix in FEATURE_SUFFIXES:
        path = Path(folder) / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _bag_arrays(path: Path, container: Any) -> tuple[Any, Any]:
    """The ``features`` and ``coords`` of an open .h5 or .npz bag (h5py datasets are not read
    here); each must be there, and in HDF5 a dataset of this file (see `_own_dataset`)."""
    keys = set(container.files if hasattr(container, "files") else container.keys())
    missing = [k for k in ("features", "coords") if k not in keys]
    if missing:
        raise InputError(
            f"{path}: a feature bag needs 'features' (N, F) and 'coords' (N, 2); "
            f"missing {', '.join(missing)} (has {', '.join(sorted(keys)) or 'nothing'})"
        )
    if hasattr(container, "files"):  # .npz
        return container["features"], container["coords"]
    return _own_dataset(path, container, "features"), _own_dataset(path, container, "coords")


def _own_dataset(path: Path, handle: Any, key: str) -> Any:
    """``handle[key]`` when it is a dataset stored in this file: not a group, not a link to
    another file or object, not external or virtual storage (those read other files)."""
    h5py = import_h5py()
    link = handle.get(key, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise InputError(
            f"{path}: '{key}' must be a dataset stored in this file, got an HDF5 "
            f"{type(link).__name__} (a link may lead to another file)"
        )
    dataset = handle[key]
    if not isinstance(dataset, h5py.Dataset):
        raise InputError(f"{path}: '{key}' must be a dataset, got a {type(dataset).__name__}")
    if dataset.external or dataset.is_virtual:
        kind = "external" if dataset.external else "virtual"
        raise InputError(
            f"{path}: '{key}' must be stored in this file, got {kind} storage "
            "(which reads other files)"
        )
    return dataset


def _contiguous_offset(features: Any, path: Path) -> int | None:
    """The byte offset in the file of an HDF5 dataset stored as one contiguous, unfiltered
    block of native byte order, all of it inside the file; None for any other layout."""
    if features.chunks is not None or features.compression or features.external:
        return None
    if features.is_virtual or not features.dtype.isnative or features.dtype.kind not in "fiu":
        return None
    offset = features.id.get_offset()  # None while the block is not allocated
    if offset is None:
        return None
    end = offset + int(np.prod(features.shape)) * features.dtype.itemsize
    return int(offset) if end <= path.stat().st_size else None


def _check_shape(name: str, shape: tuple[int, ...], dtype: Any) -> tuple[int, int]:
    """(N, F) of a ``features`` array of this shape and dtype, or an InputError naming `name`."""
    if len(shape) != 2:
        raise InputError(
            f"{name}: features must be (N, F), one row per patch, got shape {tuple(shape)}"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise InputError(
            f"{name}: features must be (N, F) with N >= 1 patches and F >= 1, got {tuple(shape)}"
        )
    if np.dtype(dtype).kind not in "fiu":
        raise InputError(
            f"{name}: features must be real numbers (float or integer), got {_dtype_name(dtype)}"
        )
    return int(shape[0]), int(shape[1])


def _check_coords_layout(name: str, shape: tuple[int, ...], dtype: Any, num_patches: int) -> None:
    if tuple(shape) != (num_patches, 2):
        raise InputError(
            f"{name}: coords must be (N, 2) level-0 (x, y) = ({num_patches}, 2), one row per "
            f"row of features, got {tuple(shape)}"
        )
    if np.dtype(dtype).kind not in "fiu":
        raise InputError(
            f"{name}: coords must be real numbers (level-0 pixels), got {_dtype_name(dtype)}"
        )


COORD_LIMIT = 2**53  # |level-0 pixels|: beyond it floats skip whole numbers; no slide is there


def _check_coords(name: str, coords: Any, num_patches: int) -> np.ndarray:
    """Coords (N, 2) as int64 whole level-0 pixels (rounded), or an InputError naming `name`."""
    coords = np.asarray(coords)
    _check_coords_layout(name, coords.shape, coords.dtype, num_patches)
    bad = ~(np.abs(coords) < COORD_LIMIT).all(axis=1)  # NaN compares False
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{name}: coords must be finite level-0 (x, y) pixels, got {coords[row].tolist()} "
            f"at row {row} (bad rows: {int(bad.sum())} of {num_patches})"
        )
    return np.rint(coords).astype(np.int64)


def _dtype_name(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    kinds = {"b": "booleans", "c": "complex numbers", "O": "objects", "S": "bytes", "U": "text"}
    return f"{kinds[dtype.kind]} ({dtype})" if dtype.kind in kinds else str(dtype)


def _positive_number(name: str, key: str, value: Any) -> float:
    """An attribute that must hold a finite number > 0 (a tile size, a downsample); of a list
    (CLAM's downsample (x, y)) the first."""
    array = np.asarray(value)
    number = float(array.reshape(-1)[0]) if array.size and array.dtype.kind in "fiu" else None
    if number is None or not math.isfinite(number) or number <= 0:
        raise InputError(f"{name}: {key} must be a number > 0, got {_plain(value)!r}")
    return number


def _grid_step(coords: np.ndarray | None) -> float | None:
    """The smallest positive gap between distinct x or y coords; None for fewer than two."""
    if coords is None or len(coords) < 2:
        return None
    gaps = np.concatenate([np.diff(np.unique(coords[:, axis])) for axis in (0, 1)])
    gaps = gaps[gaps > 0]
    return float(gaps.min()) if gaps.size else None


def tile_size_level0(handle: Any) -> float | None:
    """Level-0 tile side of an open HDF5 bag from its attributes (on ``coords`` or the file):
    ``patch_size_level0`` (TRIDENT, ips), else ``patch_size`` times ``downsample`` (ips,
    CLAM); None when it records neither."""
    name = str(getattr(handle, "filename", "HDF5 bag"))
    for attrs in (handle["coords"].attrs, handle.attrs):
        if "patch_size_level0" in attrs:
            return _positive_number(name, "patch_size_level0", attrs["patch_size_level0"])
        if "patch_size" in attrs:
            size = _positive_number(name, "patch_size", attrs["patch_size"])
            if "downsample" in attrs:
                size *= _positive_number(name, "downsample", attrs["downsample"])
            return size
    return None


def _plain(value: Any) -> Any:
    """An HDF5 attribute as a Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ---- labelled bags for training ---------------------------------------------------------------


class FeatureBagDataset(Dataset):
    """Labelled feature bags, one per slide.

    ``dataset[i]`` is a dict::

        {"patches": FeatureBag (N_i, F), read lazily by selection
                    (or a float32 (N_i, F) tensor with in_memory=True; the collate then pads
                    the batch to the largest N with a mask),
         "targets": {task: () float32 for binary tasks, () long for multiclass ones},
         "index": i}

    Every bag is opened once at construction to check that it exists, is readable and has
    the expected width F (``num_patches`` records each N); the features are read only when
    asked for.

    Args:
        bags: the bag file of each slide.
        labels: per slide, task name -> integer label.
        tasks: the tasks to serve (binary or multiclass).
        feature_dim: F every bag must have; None: the first bag's.
        names: slide names (default the bag file stems).
        in_memory: serve tensors instead of lazy bags.
    """

    def __init__(
        self,
        bags: Sequence[str | os.PathLike],
        labels: Sequence[Mapping[str, int]],
        tasks: Sequence[TaskSpec],
        *,
        feature_dim: int | None = None,
        names: Sequence[str] | None = None,
        in_memory: bool = False,
    ) -> None:
        self.bags = [Path(p) for p in bags]
        if len(labels) != len(self.bags):
            raise InputError(f"got {len(self.bags)} bags but {len(labels)} labels")
        self.names = list(names) if names is not None else [p.stem for p in self.bags]
        self.tasks = tuple(tasks)
        for task in self.tasks:
            if task.kind == "multilabel":
                raise InputError(
                    f"model.tasks.{task.name}: feature-bag datasets serve binary and "
                    "multiclass tasks, not multilabel ones"
                )
        self.labels = [dict(label) for label in labels]
        for name, label in zip(self.names, self.labels, strict=True):
            for task in self.tasks:
                _check_label(name, task, label)
        self.in_memory = in_memory
        self.num_patches: list[int] = []
        for path in self.bags:
            with open_feature_bag(path) as bag:
                if feature_dim is None:
                    feature_dim = bag.feature_dim
                if bag.feature_dim != feature_dim:
                    raise InputError(
                        f"{path}: features have width F={bag.feature_dim}, "
                        f"expected F={feature_dim} (model.feature_dim)"
                    )
                self.num_patches.append(len(bag))
        self.feature_dim = feature_dim

    def __len__(self) -> int:
        return len(self.bags)

    def describe(self, i: int) -> str:
        """Bag i for a message: its file."""
        return str(self.bags[i])

    def __getitem__(self, i: int) -> dict[str, Any]:
        bag = open_feature_bag(self.bags[i])
        patches: Any = bag
        if self.in_memory:
            with bag:
                patches = torch.from_numpy(bag.read(np.arange(len(bag))))  # (N, F)
        return {"patches": patches, "targets": self.targets(i), "index": i}

    def targets(self, i: int) -> dict[str, torch.Tensor]:
        """Labels of slide i: () float32 per binary task, () long per multiclass task."""
        out = {}
        for task in self.tasks:
            value = self.labels[i][task.name]
            dtype = torch.float32 if task.kind == "binary" else torch.long
            out[task.name] = torch.tensor(value, dtype=dtype)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(slides={len(self)}, F={self.feature_dim}, "
            f"tasks={[t.name for t in self.tasks]})"
        )


def _check_label(name: str, task: TaskSpec, label: Mapping[str, int]) -> None:
    if task.name not in label:
        raise InputError(f"{name}: no label for task {task.name!r} (has {sorted(label)})")
    value = label[task.name]
    classes = 2 if task.kind == "binary" else task.num_classes
    if int(value) != value or not 0 <= value < classes:
        raise InputError(
            f"{name}: label {value!r} of task {task.name!r} must be an integer in [0, {classes})"
        )


def read_labels_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a labels CSV: a header with ``slide`` (the bag's name, without suffix), one
    column per task (integer labels) and optionally ``split`` (``train`` or ``test``; rows
    without one are training slides)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: labels file not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "slide" not in reader.fieldnames:
            raise InputError(
                f"{path}: a labels CSV needs a header with a 'slide' column, "
                f"got {reader.fieldnames}"
            )
        return [dict(row) for row in reader]


def labelled_bags(
    folder: str | os.PathLike,
    rows: Sequence[Mapping[str, str]],
    tasks: Sequence[TaskSpec],
    split: str,
    *,
    source: str = "labels",
    missing: str = "fail",
) -> tuple[list[Path], list[dict[str, int]], list[str]]:
    """Match labelled slides of one split to their bags in `folder`.

    Returns:
        bag paths, labels (task -> int) and slide names, in the order of `rows`.
    """
    if missing not in ("fail", "skip"):
        raise InputError(f"data.options.missing must be 'fail' or 'skip', got {missing!r}")
    bags, labels, names, absent = [], [], [], []
    for row in rows:
        if ((row.get("split") or "").strip() or "train") != split:  # no split: training
            continue
        name = row["slide"].strip()
        label = {}
        for task in tasks:
            raw = (row.get(task.name) or "").strip()
            try:
                label[task.name] = int(raw)
            except ValueError:
                raise InputError(
                    f"{source}: slide {name}: label of task {task.name!r} must be an integer, "
                    f"got {raw!r}"
                ) from None
        path = find_bag(folder, name)
        if path is None:
            absent.append(name)
            continue
        bags.append(path)
        labels.append(label)
        names.append(name)
    if absent:
        message = (
            f"{folder}: no feature bag for {len(absent)} slide(s) of the {split} split "
            f"({', '.join(absent[:5])}{', ...' if len(absent) > 5 else ''}); "
            "extract them with `ips extract-features`"
        )
        if missing == "fail":
            raise MissingFileError(message + " or set data.options.missing: skip")
        log.warning("%s; left out", message)
    if not bags:
        raise InputError(f"{source}: no slide of the {split} split has a feature bag")
    return bags, labels, names


# ---- plain .npy rows (the memory benchmark's reader) ------------------------------------------

_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class FeatureFile:
    """Rows of a 2-D C-order `.npy` file (N, F), read lazily with plain file reads.

    Nothing is memory-mapped, so rows read once do not stay resident in the process; the
    requested rows are read in runs of consecutive ids. Picklable: each process opens its own
    file handle.

    Args:
        path: the `.npy` file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"{self.path}: no such file")
        with open(self.path, "rb") as fh:
            try:
                version = np.lib.format.read_magic(fh)
                if version not in _HEADER_READERS:
                    raise InputError(f"format version {version} is not supported")
                shape, fortran, dtype = _HEADER_READERS[version](fh)
            except ValueError as err:
                raise InputError(f"{self.path}: not a readable .npy file ({err})") from None
            self.offset = fh.tell()
        if len(shape) != 2 or fortran or dtype.hasobject:
            raise InputError(
                f"{self.path}: expected a C-order (N, F) numeric array, got shape {shape}"
                f"{' in Fortran order' if fortran else ''} of {dtype}"
            )
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows `ids` (n,) in the given order. Returns: (n, F)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            bad = ids[(ids < 0) | (ids >= len(self))][0]
            raise IndexError(f"{self.path.name}: row ids must be in [0, {len(self)}), got {bad}")
        row_bytes = self.shape[1] * self.dtype.itemsize
        out = np.empty((len(ids), self.shape[1]), dtype=self.dtype)
        if len(ids) == 0:
            return out
        fd = self._handle()
        order = np.argsort(ids, kind="stable")
        wanted = ids[order]
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1  # starts of runs of consecutive ids
        for run in np.split(np.arange(len(wanted)), breaks):
            first, count = int(wanted[run[0]]), len(run)
            data = os.pread(fd, count * row_bytes, self.offset + first * row_bytes)
            if len(data) != count * row_bytes:
                raise InputError(f"{self.path}: file is shorter than its header says")
            rows = np.frombuffer(data, dtype=self.dtype).reshape(count, self.shape[1])
            out[order[run]] = rows
        return out

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureFile({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"
