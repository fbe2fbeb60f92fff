"""Your own images and slides: a labels table, or a folder of class folders.

A table (``.csv``, or ``.tsv`` with tabs) names one image or slide per row::

    path,diagnosis,grade,split,mask
    slides/a.svs,tumour,2,train,masks/a.geojson
    slides/b.ndpi,normal,,val,
    photos/c.jpg,normal,0,test,

* ``path``: a file `ips.sources.open_source` reads (photos, TIFFs, pyramidal slides, mixed),
  relative to the table's folder or absolute;
* one column per task of ``model.tasks``, by name: multiclass as integers or class names
  (names map to indices in sorted order, or in the order of ``model.tasks.<name>.classes``),
  binary as 0 / 1 / true / false (or the two names of its ``classes``), multilabel as
  ``;``-separated labels (names or integers; ``-`` for none). An empty cell (or pandas' NaN,
  NA, N/A, null) is unknown: the row adds no loss and no metric for that task;
* optional ``split``: ``train``, ``val`` or ``test`` (empty: train);
* optional ``mask``: a tissue mask (image, non-zero = tissue, or GeoJSON polygons in level-0
  pixels, e.g. a QuPath export) for that row's image.

An image folder is torchvision's ``ImageFolder`` layout, one multiclass task whose classes
are the folder names (sorted)::

    ROOT/<class>/<image>                          or
    ROOT/train/<class>/<image>, ROOT/test/<class>/<image> (and ROOT/val/<class>/<image>)

Both give an `ImageDataset`: item i is ``{"patches": PatchSource, "targets", "index"}``, the
source opened lazily on the image with the run's grid (``model.patch_size``, ``data.grid``),
its tissue filter taken from a `GridCache` after the first time. Every error names the
table's line (``labels.csv:12``) or the file.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ips.config import GridConfig, TaskSpec
from ips.errors import InputError, MissingFileError, located
from ips.sources import PatchSource, open_source
from ips.sources.base import OPENSLIDE_SUFFIXES, PILLOW_SUFFIXES, TIFF_SUFFIXES
from ips.sources.grid_cache import GridCache

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".tsv")
IMAGE_SUFFIXES = PILLOW_SUFFIXES | TIFF_SUFFIXES | OPENSLIDE_SUFFIXES  # found in class folders
SPLIT_NAMES = {
    "": "train",
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
RESERVED = ("path", "split", "mask")  # columns that are not tasks
NO_LABELS = "-"  # a multilabel cell: none of the labels is present
MISSING = ("", "nan", "na", "n/a", "null")  # a label cell that is unknown (pandas' NA markers)
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


@dataclass(frozen=True)
class Row:
    """One image of a table or an image folder."""

    path: Path  # the image or slide
    labels: dict[str, str]  # task -> the cell as written (stripped); "" is unknown
    split: str  # "train", "val" or "test"
    mask: Path | None = None  # its tissue mask, if any
    where: str = ""  # "labels.csv:12" (or the file) for errors


# ---- reading ---------------------------------------------------------------------------------


def read_table(
    path: str | os.PathLike, task_names: Sequence[str], *, require_tasks: bool = True
) -> list[Row]:
    """The rows of a labels table; paths and masks relative to the table's folder.

    Args:
        path: the ``.csv`` or ``.tsv`` file.
        task_names: the tasks whose columns are read.
        require_tasks: a task without a column is an error (else its labels are unknown).

    Raises:
        FileNotFoundError: no such table.
        ValueError: one line naming the table (and its line): no ``path`` or task column, an
            empty path, an unknown split.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(
            f"{path}: a folder; a table is a .csv or .tsv file (class folders: "
            "data.dataset: image_folder)"
        )
    if not path.is_file():
        raise MissingFileError(f"{path}: no such table")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(f"{path}: a table must be a .csv or .tsv file")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's UTF-8 mark
            reader = csv.DictReader(fh, delimiter=delimiter)
            header = [name.strip() for name in reader.fieldnames or []]
            records = [(reader.line_num, record) for record in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(
            f"{path}: cannot read as a {delimiter!r}-separated table ({err})"
        ) from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(f"{path}: the header names {', '.join(repeated)} more than once")
    columns = {name: name for name in header}
    for name in RESERVED:  # "Path", "SPLIT", ...: the reserved columns in any case
        for column in header:
            if column.lower() == name and name not in columns:
                columns[name] = column
    if "path" not in columns:
        raise InputError(
            f"{path}: a table needs a 'path' column (the image or slide of each row); "
            f"the header has {', '.join(header) or 'nothing'}"
        )
    missing = [name for name in task_names if name not in header]
    if missing and require_tasks:
        raise InputError(
            f"{path}: no column for task(s) {', '.join(missing)} of model.tasks; "
            f"the header has {', '.join(header)}"
        )
    folder = path.parent
    rows = []
    for line, record in records:
        stripped = {(k or "").strip(): (v or "").strip() for k, v in record.items() if k}
        cells = {name: stripped.get(column, "") for name, column in columns.items()}
        where = f"{path}:{line}"
        if not any(cells.values()):
            continue  # a blank line
        if not cells.get("path"):
            raise InputError(f"{where}: the path cell is empty")
        split = cells.get("split", "").lower()
        if split not in SPLIT_NAMES:
            raise InputError(
                f"{where}: split {cells['split']!r} is not one of train, val, test (or empty)"
            )
        mask = cells.get("mask") or None
        rows.append(
            Row(
                path=_relative_to(folder, cells["path"]),
                labels={name: _label_cell(cells.get(name, "")) for name in task_names},
                split=SPLIT_NAMES[split],
                mask=None if mask is None else _relative_to(folder, mask),
                where=where,
            )
        )
    if not rows:
        raise InputError(f"{path}: the table has no rows")
    return rows


def _label_cell(cell: str) -> str:
    """The cell, or "" where it marks a missing value as pandas writes or reads them."""
    return "" if cell.lower() in MISSING else cell


def _relative_to(folder: Path, cell: str) -> Path:
    path = Path(cell).expanduser()
    return path if path.is_absolute() else folder / path


def read_image_folder(root: str | os.PathLike, task: str) -> tuple[list[Row], tuple[str, ...]]:
    """The images of an ``ImageFolder`` layout and its classes (folder names, sorted).

    Args:
        root: ``ROOT/<class>/*`` or ``ROOT/{train,val,test}/<class>/*``.
        task: the name of the one task the labels go to.
    """
    from torchvision.datasets.folder import find_classes, make_dataset

    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"{root}: no such image folder")
    splits = [name for name in ("train", "val", "test") if (root / name).is_dir()]
    if "train" not in splits:
        splits = []  # ROOT/<class>/*: no split folders
    folders = [(root / name, name) for name in splits] or [(root, "train")]
    classes: set[str] = set()
    for folder, _ in folders:
        try:
            classes.update(find_classes(str(folder))[0])
        except FileNotFoundError:
            raise InputError(
                f"{folder}: no class folders; expected {folder}/<class>/<image> files"
            ) from None
    ordered = tuple(sorted(classes))
    index = {name: i for i, name in enumerate(ordered)}
    rows = []
    for folder, split in folders:
        present = {name: index[name] for name in find_classes(str(folder))[0]}
        try:
            found = make_dataset(str(folder), present, extensions=tuple(sorted(IMAGE_SUFFIXES)))
        except FileNotFoundError as err:
            raise InputError(f"{folder}: {' '.join(str(err).split())}") from None
        for file, label in found:
            rows.append(Row(Path(file), {task: ordered[label]}, split, where=str(file)))
    return rows, ordered


# ---- labels ----------------------------------------------------------------------------------


def resolve_tasks(
    rows: Sequence[Row], tasks: Sequence[TaskSpec], source: str
) -> tuple[TaskSpec, ...]:
    """The tasks with the classes the rows use: names (sorted, unless ``classes`` lists them)
    and ``num_classes`` where it was left out.

    Raises:
        ValueError: naming ``source`` and the line: a name in a column of integers, a label
            out of range, more or fewer named classes than ``num_classes``.
    """
    return tuple(_resolve_task(rows, task, source) for task in tasks)


def _resolve_task(rows: Sequence[Row], task: TaskSpec, source: str) -> TaskSpec:
    cells = [(row, row.labels[task.name]) for row in rows if row.labels[task.name]]
    if task.kind == "binary":
        for row, cell in cells:
            _binary(cell, task, row.where)
        return task
    tokens = [(row, t) for row, cell in cells for t in _tokens(cell, task)]
    if task.classes is not None:
        for row, token in tokens:
            _class_index(token, task, row.where)
        return task
    named = [(row, t) for row, t in tokens if _integer(t) is None]
    if named and len(named) < len(tokens):  # names where the other labels are integers
        row, token = named[0]
        example = next(t for _, t in tokens if _integer(t) is not None)
        raise InputError(
            f"{row.where}: task {task.name}: {token!r} is not an integer, but other rows of "
            f"the column give integer labels (e.g. {example!r}); use one or the other, or "
            f"list the class names in model.tasks.{task.name}.classes"
        )
    if named:
        names = tuple(sorted({t for _, t in named}))
        if task.num_classes is not None and task.num_classes != len(names):
            raise InputError(
                f"{source}: task {task.name} names {len(names)} classes ({', '.join(names)}), "
                f"model.tasks.{task.name}.num_classes is {task.num_classes}; list all "
                f"{task.num_classes} in model.tasks.{task.name}.classes"
            )
        return dataclasses.replace(task, num_classes=len(names), classes=names)
    values = [(row, _integer(t)) for row, t in tokens]
    if task.num_classes is None:
        if not values:
            raise InputError(
                f"{source}: task {task.name} has no labels, so its number of classes is "
                f"unknown; set model.tasks.{task.name}.num_classes"
            )
        return dataclasses.replace(task, num_classes=max(v for _, v in values) + 1)
    for row, value in values:
        _check_range(value, task, row.where)
    return task


def encode_labels(row: Row, tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
    """The targets of a row for resolved tasks; unknown: -1 (multiclass), NaN (binary), NaN
    per label (multilabel)."""
    out = {}
    for task in tasks:
        cell = row.labels.get(task.name, "")
        if task.kind == "multiclass":
            value = _class_index(cell, task, row.where) if cell else -1
            out[task.name] = torch.tensor(value, dtype=torch.long)
        elif task.kind == "binary":
            value = float(_binary(cell, task, row.where)) if cell else math.nan
            out[task.name] = torch.tensor(value, dtype=torch.float32)
        else:
            target = torch.full((task.num_outputs,), math.nan if not cell else 0.0)
            for token in _tokens(cell, task) if cell else ():
                target[_class_index(token, task, row.where)] = 1.0
            out[task.name] = target
    return out


def _tokens(cell: str, task: TaskSpec) -> list[str]:
    if task.kind != "multilabel":
        return [cell]
    if cell == NO_LABELS:
        return []
    return [t.strip() for t in cell.split(";") if t.strip()]


def _integer(token: str) -> int | None:
    """``"2"`` and ``"2.0"`` (pandas writes integers of a column with gaps so) -> 2."""
    try:
        value = float(token)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value.is_integer() else None


def _class_index(token: str, task: TaskSpec, where: str) -> int:
    if task.classes is not None:
        if token in task.classes:
            return task.classes.index(token)
        value = _integer(token)
        if value is None:
            raise InputError(
                f"{where}: task {task.name}: unknown class {token!r}; expected one of "
                f"{', '.join(task.classes)}"
            )
    else:
        value = _integer(token)
        if value is None:
            raise InputError(f"{where}: task {task.name}: {token!r} is not an integer label")
    _check_range(value, task, where)
    return value


def _check_range(value: int, task: TaskSpec, where: str) -> None:
    if not 0 <= value < task.num_outputs:
        what = "labels" if task.kind == "multilabel" else "classes"
        raise InputError(
            f"{where}: task {task.name}: label {value} is out of range; the task has "
            f"{task.num_outputs} {what} (0 to {task.num_outputs - 1})"
        )


def _binary(cell: str, task: TaskSpec, where: str) -> int:
    lowered = cell.lower()
    if lowered in TRUE or _integer(cell) == 1:
        return 1
    if lowered in FALSE or _integer(cell) == 0:
        return 0
    if task.classes is not None and cell in task.classes:
        return task.classes.index(cell)
    names = (
        f", or {' / '.join(task.classes)}"
        if task.classes
        else f" (or name the two classes, negative first, in model.tasks.{task.name}.classes)"
    )
    raise InputError(
        f"{where}: task {task.name}: {cell!r} is not a binary label; expected 0, 1, true or "
        f"false{names}"
    )


# ---- checks ----------------------------------------------------------------------------------


def missing_files(rows: Sequence[Row]) -> list[tuple[Row, str]]:
    """Each row whose image or mask does not exist, with ``where: image|mask PATH``."""
    out = []
    for row in rows:
        for kind, path in (("image", row.path), ("mask", row.mask)):
            if path is not None and not path.is_file():
                out.append((row, f"{row.where}: {kind} {path}"))
    return out


def check_files(rows: Sequence[Row], source: str, *, fail: bool) -> list[Row]:
    """The rows whose files exist. Every missing image or mask of ``rows`` is listed at once:
    in an error (``fail``), else in a warning, and those rows are left out."""
    missing = missing_files(rows)
    if not missing:
        return list(rows)
    texts = [text for _, text in missing]
    shown = "; ".join(texts[:5]) + (f"; and {len(texts) - 5} more" if len(texts) > 5 else "")
    message = f"{source}: {len(texts)} file(s) not found: {shown}"
    if fail:
        raise MissingFileError(message + " (or set data.on_error: skip to leave them out)")
    log.warning("%s; left out", message)
    gone = {id(row) for row, _ in missing}
    return [row for row in rows if id(row) not in gone]


# ---- the dataset -----------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Labelled images and slides, read lazily.

    ``dataset[i]`` is::

        {"patches": PatchSource over image i (N_i patches of C x P x P, read on demand),
         "targets": {task: () long (multiclass, -1 unknown), () float32 (binary, NaN
                     unknown), (labels,) float32 (multilabel, NaN unknown)},
         "index": i}

    Args:
        rows: the images, their labels and masks.
        tasks: resolved tasks (see `resolve_tasks`).
        patch_size: P, pixels at the read resolution.
        grid: stride, resolution and tissue filter.
        channels: C the model reads; an image with another count is an error naming it.
        grid_cache: where tissue filters are looked up and stored (None: computed each time).
    """

    def __init__(
        self,
        rows: Sequence[Row],
        tasks: Sequence[TaskSpec],
        *,
        patch_size: int,
        grid: GridConfig = GridConfig(),
        channels: int | None = None,
        grid_cache: GridCache | None = None,
    ) -> None:
        self.rows = list(rows)
        self.tasks = tuple(tasks)
        self.patch_size = int(patch_size)
        self.grid = grid
        self.channels = channels
        self.grid_cache = grid_cache
        self._targets = [encode_labels(row, self.tasks) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def open(self, i: int) -> PatchSource:
        """The patch source of image i (the caller closes it, or lets it go)."""
        row = self.rows[i]
        try:
            source = open_source(
                row.path,
                patch_size=self.patch_size,
                grid=self.grid,
                mask=row.mask,
                grid_cache=self.grid_cache,
            )
        except Exception as err:
            renamed = located(err, row.where)
            if renamed is err:
                raise
            raise renamed from err
        if self.channels is not None and source.channels != self.channels:
            source.close()
            raise InputError(
                f"{row.where}: {row.path.name} has {source.channels} channel(s), the model "
                f"reads {self.channels} (model.in_channels)"
            )
        return source

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"patches": self.open(i), "targets": self.targets(i), "index": i}

    def describe(self, i: int) -> str:
        """Image i for a message: its row and file."""
        row = self.rows[i]
        return f"{row.where}: {row.path}" if row.where else str(row.path)

    def targets(self, i: int) -> dict[str, torch.Tensor]:
        """The targets of image i (see the class docstring)."""
        return {name: value.clone() for name, value in self._targets[i].items()}

    def __repr__(self) -> str:
        return f"ImageDataset(images={len(self)}, tasks={[t.name for t in self.tasks]})"


def split_rows(rows: Sequence[Row], split: str) -> list[Row]:
    """The rows of one split."""
    return [row for row in rows if row.split == split]
