"""Feature bags: the precomputed features of one image's patches, read lazily.

One file per slide, as ``ips extract-features`` writes it::

    tumor_001.h5
    ├── features (N, F) float32   one row per tissue tile, stored contiguously
    ├── coords (N, 2) int64       level-0 (x, y) of each tile's top-left corner
    └── attributes                patch_size (P, pixels at the read resolution), downsample
                                  (level-0 pixels per read pixel), level, mpp, encoder,
                                  feature_dim, ips_version, ... (see ``ips.features``)

``.npz`` files with the same two arrays (and optionally ``patch_size``, level-0 pixels) and
``.npy`` files holding the features alone (no coords) are read too, loaded whole.

`FeatureBag` is a patch container for selection: ``len(bag)`` = N, ``bag.read(ids)`` ->
float32 (n, F), ``bag.positions(ids)``. An HDF5 bag reads only the requested rows, opens its
file on the first read in each process and pickles without its handle, so bags can be made in
`DataLoader` workers and read in the main process. Rows that hold NaN or inf raise a
ValueError naming the file.

`FeatureBagDataset` serves labelled bags to training; the ``feature_bags`` dataset reads the
labels from a CSV file. `FeatureFile` reads rows of a plain ``.npy`` file without a memory map
(used by the memory benchmark).
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
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
    def read(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Features of patches. Args: ids: (n,) ints in [0, N). Returns: float32 (n, F)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        bad = (ids < 0) | (ids >= len(self))
        if bad.any():
            raise IndexError(
                f"{self.name}: patch ids must be in [0, {len(self)}), got {ids[bad][0]}"
            )
        unique, inverse = np.unique(ids, return_inverse=True)  # increasing rows read once
        rows = np.asarray(self._rows(unique), dtype=np.float32)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            raise InputError(
                f"{self.name}: features hold NaN or inf (patch {int(unique[~finite][0])} and "
                f"{int((~finite).sum()) - 1} more of those read); re-extract this bag"
            )
        return rows[inverse]

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (increasing, unique) as stored."""
        return self._features[ids]

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(row, col) on the grid of the coords. Args: ids: (n,). Returns: (n, 2) int64."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        coords = self.coords
        if coords is None:
            return np.stack([np.zeros_like(ids), ids], axis=1)
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
            if tuple(coords.shape) != (self._shape[0], 2):
                raise InputError(
                    f"{self.path}: coords must be (N, 2) = ({self._shape[0]}, 2), "
                    f"got {tuple(coords.shape)}"
                )
            self._patch_size = tile_size_level0(handle)
            self.attrs = {key: _plain(value) for key, value in handle.attrs.items()}
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

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        return self._file()["features"][ids]

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


def open_feature_bag(path: str | os.PathLike) -> FeatureBag:
    """Open a feature bag: ``.h5``/``.hdf5`` (lazy) or ``.npz`` with ``features`` (N, F) and
    ``coords`` (N, 2) level-0 (x, y), optionally ``patch_size`` (level-0 pixels); ``.npy`` with
    the features only (then the patches have no coords)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return H5FeatureBag(path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"{path}: cannot read as a numpy file ({_one_line(err)})") from None
    if isinstance(data, np.ndarray):  # .npy: the features alone
        _check_shape(str(path), data.shape, data.dtype)
        log.warning("%s: a .npy bag has no coords; no heatmap or GeoJSON for it", path)
        return FeatureBag(data, None, name=path.name)
    with data:
        features, coords = _bag_arrays(path, data)
        size = float(data["patch_size"]) if "patch_size" in data.files else None
        return FeatureBag(np.asarray(features), np.asarray(coords), patch_size=size, name=path.name)


def find_bag(folder: str | os.PathLike, name: str) -> Path | None:
    """The bag of the image called `name` in `folder` (``name.h5``, ``.hdf5``, ``.npz`` or
    ``.npy``, in that order), or None."""
    for suffix in FEATURE_SUFFIXES:
        path = Path(folder) / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _bag_arrays(path: Path, container: Any) -> tuple[Any, Any]:
    keys = set(container.files if hasattr(container, "files") else container.keys())
    missing = [k for k in ("features", "coords") if k not in keys]
    if missing:
        raise InputError(
            f"{path}: a feature bag needs 'features' (N, F) and 'coords' (N, 2); "
            f"missing {', '.join(missing)} (has {', '.join(sorted(keys)) or 'nothing'})"
        )
    return container["features"], container["coords"]


def _check_shape(name: str, shape: tuple[int, ...], dtype: Any) -> tuple[int, int]:
    if len(shape) != 2 or shape[0] == 0:
        raise InputError(f"{name}: features must be (N, F) with N >= 1, got {tuple(shape)}")
    if np.dtype(dtype).kind not in "fiu":
        raise InputError(f"{name}: features must be numbers, got {np.dtype(dtype)}")
    return int(shape[0]), int(shape[1])


def _check_coords(name: str, coords: Any, num_patches: int) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.shape != (num_patches, 2):
        raise InputError(f"{name}: coords must be (N, 2) = ({num_patches}, 2), got {coords.shape}")
    if coords.dtype.kind == "f" and not np.isfinite(coords).all():
        raise InputError(f"{name}: coords hold NaN or inf")
    return np.rint(coords).astype(np.int64)


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
    for attrs in (handle["coords"].attrs, handle.attrs):
        if "patch_size_level0" in attrs:
            return float(np.asarray(attrs["patch_size_level0"]).reshape(-1)[0])
        if "patch_size" in attrs:
            size = float(np.asarray(attrs["patch_size"]).reshape(-1)[0])
            if "downsample" in attrs:
                size *= float(np.asarray(attrs["downsample"]).reshape(-1)[0])
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
