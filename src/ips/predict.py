"""Inference on new images, slides and feature bags: probabilities, selected patches, pictures.

``predict("best.pt", ["slide.svs", "photos/", "labels.csv"], out_dir="predictions")`` writes::

    predictions/
    ├── predictions.csv        one row per input: per task the predicted label and its probability
    ├── predictions.jsonl      one JSON object per input: everything, selected patches included
    ├── metrics.json           when a table gave labels: the metrics of the predictions
    └── <name>/                one folder per input (the file name without its suffix)
        ├── heatmap.png        the selection score of every patch over a thumbnail
        ├── selected.png       the K selected patches over the image, coloured by score
        ├── gallery.png        the best selected patches at full resolution, with their scores
        ├── selected.geojson   the K selected patches in level-0 pixels (QuPath annotations)
        └── scores.npz         coords (N, 2), scores (N,) of every patch, selected ids (K,)

Letters: N patches of an image, M memory size, K = min(M, N) selected patches.

Images are cut as the checkpoint's training cut its images (``model.patch_size`` and
``data.grid``: stride, resolution, tissue filter), unless ``grid`` says otherwise. A table
(``.csv`` / ``.tsv``, see ``ips.data.table``) gives its rows' images and masks; where it has
task columns, ``metrics.json`` scores the predictions against them, and class names are
written where the model's tasks have them.

One selection pass per image scores every patch (the ``observe`` hook of the selection loop
collects the last score each patch received, at no extra encoder cost); the K selected patches
are then encoded again, pooled and classified, with every module in eval mode and a fixed
visiting order (``seed``). Feature bags (``.h5``/``.hdf5``/``.npz`` with ``features`` (N, F) and
``coords`` (N, 2), or ``.npy`` with the features only) go to models with ``encoder="features"``;
they have no pixels, so they get only the heatmap (on a blank canvas) and the GeoJSON.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ips.config import GridConfig, TaskSpec, replace_fields
from ips.data.feature_bags import FEATURE_SUFFIXES, FeatureBag, open_feature_bag
from ips.data.table import TABLE_SUFFIXES, encode_labels, read_table, split_rows
from ips.data.table import Row as TableRow
from ips.errors import one_line
from ips.files import atomic_write
from ips.heads import compute_loss, predictions, probabilities
from ips.model import IPSModel, load_model_and_config
from ips.selection import Selection, eval_mode
from ips.sources import ArraySource, PatchSource, open_source
from ips.sources.base import OPENSLIDE_SUFFIXES, PILLOW_SUFFIXES, TIFF_SUFFIXES, grid_options
from ips.viz import SCALES

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = PILLOW_SUFFIXES | TIFF_SUFFIXES | OPENSLIDE_SUFFIXES  # found in folders
ON_ERROR = ("skip", "fail")

Input = str | os.PathLike | np.ndarray | Tensor  # a file, a folder, or an image (H, W[, C])


@dataclass(frozen=True, eq=False)
class Prediction:
    """What the model says about one input, and which patches it looked at.

    Arrays are numpy; K selected patches of N. ``probabilities``: per task the softmax over
    classes (multiclass), [P(label 1)] (binary) or one sigmoid per label (multilabel).
    ``selected_*``: best first. Coords are level-0 (x, y) top-left corners (-1 where a feature
    bag has none). ``all_scores``: the last selection score of every patch, on the scale of the
    last candidate set (see ``ScoreMap``). A failed input has ``error`` set, empty
    probabilities and predictions, and empty arrays.
    """

    name: str  # unique among one call's inputs; the name of its output folder
    path: str | None  # the input file; None for an in-memory array
    probabilities: dict[str, list[float]] = field(default_factory=dict)  # per task (see below)
    predicted: dict[str, int | list[int]] = field(default_factory=dict)  # class, or 0/1 per label
    logits: dict[str, list[float]] = field(default_factory=dict)  # per task, as the heads gave
    selected_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (K,)
    selected_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    selected_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (K,)
    all_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,)
    all_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (N, 2)
    patch_size: float = 0.0  # side of a patch in level-0 pixels
    image_size: tuple[int, int] = (0, 0)  # level-0 (width, height)
    error: str | None = None  # one line, when the input could not be predicted
    outputs: dict[str, str] = field(default_factory=dict)  # kind -> path of each written file

    @property
    def ok(self) -> bool:
        """True when the input was predicted."""
        return self.error is None


# ---- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    name: str  # unique output name
    path: Path | None  # the file, None for an array
    array: Any = None  # an in-memory image
    mask: Path | None = None  # its tissue mask (a table's mask column, or the call's mask)
    row: TableRow | None = None  # the table row it came from (labels, line)


def _expand(
    inputs: Input | Sequence[Input],
    features: bool,
    tasks: Sequence[TaskSpec],
    *,
    mask: Path | None = None,
    split: str | None = None,
) -> list[_Item]:
    """Paths, folders (their supported files, sorted), tables (their rows), arrays ->
    uniquely named items."""
    if isinstance(inputs, (str, os.PathLike, np.ndarray, Tensor)):
        inputs = [inputs]
    wanted = FEATURE_SUFFIXES if features else IMAGE_SUFFIXES
    named: list[tuple[str, Path | None, Any, TableRow | None]] = []
    for i, entry in enumerate(inputs):
        if isinstance(entry, (np.ndarray, Tensor)):
            named.append((f"array_{i}", None, entry, None))
        elif isinstance(entry, (str, os.PathLike)):
            path = Path(entry)
            if path.suffix.lower() in TABLE_SUFFIXES and path.is_file():
                rows = read_table(path, [t.name for t in tasks], require_tasks=False)
                if split is not None:
                    rows = split_rows(rows, split)
                    if not rows:
                        log.warning("%s: no row of the %s split", path, split)
                named.extend((row.path.stem or row.path.name, row.path, None, row) for row in rows)
            elif path.is_dir():
                files = sorted(
                    p
                    for p in path.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in wanted
                )
                if not files:
                    log.warning("%s: no %s files in this folder", path, "/".join(sorted(wanted)))
                named.extend((p.stem, p, None, None) for p in files)
            else:
                named.append((path.stem or path.name, path, None, None))
        else:
            raise TypeError(
                "inputs must be paths, folders, numpy arrays or tensors, "
                f"got {type(entry).__name__}"
            )
    if not named:
        raise ValueError("no inputs to predict (empty list, or folders without supported files)")
    items, seen = [], set()
    for name, path, array, row in named:
        base = re.sub(r"[^\w.-]+", "_", name).strip("._") or "input"
        unique, n = base, 1
        while unique in seen:
            n += 1
            unique = f"{base}-{n}"
        seen.add(unique)
        where = row.mask if row is not None and row.mask is not None else mask
        items.append(_Item(unique, path, array, where, row))
    return items


def _open(item: _Item, model: IPSModel, grid: GridConfig) -> PatchSource | FeatureBag:
    """Open one input as a patch container the model can read."""
    cfg = model.model_config
    label = item.row.where if item.row is not None else str(item.path or item.name)
    is_bag = item.path is not None and item.path.suffix.lower() in FEATURE_SUFFIXES
    if model.is_features:
        if not is_bag:
            raise ValueError(
                f"{label}: the model reads precomputed features (encoder 'features'); "
                f"give feature bags ({', '.join(sorted(FEATURE_SUFFIXES))}), not images"
            )
        bag = open_feature_bag(item.path)
        if bag.feature_dim != cfg.feature_dim:
            bag.close()
            raise ValueError(
                f"{label}: features have width F={bag.feature_dim}, "
                f"the model expects F={cfg.feature_dim} (model.feature_dim)"
            )
        return bag
    if is_bag:
        raise ValueError(
            f"{label}: a feature bag, but the model reads pixels (encoder {cfg.encoder!r})"
        )
    if item.array is not None:
        kwargs = grid_options(grid, item.mask, name=label)
        files_only = sorted({"level", "downsample", "target_mpp"} & set(kwargs))
        if files_only:
            raise ValueError(f"{label}: {', '.join(files_only)} apply to files, not to arrays")
        source = ArraySource(
            item.array,
            patch_size=cfg.patch_size,
            channels_last=_channels_last(item.array),
            name=item.name,
            **kwargs,
        )
    else:
        source = open_source(item.path, patch_size=cfg.patch_size, grid=grid, mask=item.mask)
    if source.channels != cfg.in_channels:
        source.close()
        raise ValueError(
            f"{label}: the image has {source.channels} channel(s), "
            f"the model expects {cfg.in_channels} (model.in_channels)"
        )
    return source


def _channels_last(array: Any) -> bool | None:
    """(H, W, C) unless the array is clearly (C, H, W); None for 2-D arrays."""
    shape = tuple(array.shape)
    if len(shape) != 3:
        return None
    return not (shape[0] <= 4 < shape[-1])


# ---- the model --------------------------------------------------------------------------------


def _prepare_model(
    checkpoint_or_model: IPSModel | str | os.PathLike,
    device: torch.device,
    overrides: dict[str, Any],
) -> tuple[IPSModel, GridConfig, Callable[[], None]]:
    """The model on ``device`` with selection overrides, the grid it was trained with (a
    checkpoint's ``data.grid``; the default grid for a model object), and a function undoing
    the overrides on a model object the caller passed."""
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        model, config = load_model_and_config(checkpoint_or_model, map_location="cpu", **overrides)
        return model.to(device), config.data.grid, lambda: None
    if not isinstance(checkpoint_or_model, IPSModel):
        raise TypeError(
            "checkpoint_or_model must be an IPSModel or a checkpoint path, "
            f"got {type(checkpoint_or_model).__name__}"
        )
    model = checkpoint_or_model
    previous = model.selection_config
    if overrides:
        model.selection_config = replace_fields(model.config, **overrides).selection

    def restore() -> None:
        model.selection_config = previous

    return model.to(device), GridConfig(), restore


class ScoreMap:
    """Collects the selection score of every patch, on one scale, as an ``observe`` hook.

    Each candidate set's scores are attention shares normalised over that set, so a patch
    scored early, beside other candidates, is not comparable as it stands with one scored
    late. Consecutive sets share the patches kept in memory: the mean difference of their log
    scores between the two sets is the change of normaliser (exact with one head and one
    query, a mean over heads and queries otherwise). Every patch keeps the last score it got,
    moved onto the scale of the last set; so the selected patches keep their final scores and
    the order of all scores is the order of a single global pass.

    Args:
        lengths: N of each image of the batch.
    """

    def __init__(self, lengths: Sequence[int]):
        self._log = [np.full(n, np.nan) for n in lengths]  # last log score + its set's offset
        self._offset = [0.0] * len(lengths)  # offset of the latest set, per image

    def __call__(self, ids: Tensor, scores: Tensor, valid: Tensor) -> None:
        """Args: ids, scores, valid: (B, K) one scored candidate set per image."""
        for b, log in enumerate(self._log):
            keep = valid[b].numpy()
            where = ids[b].numpy()[keep]
            with np.errstate(divide="ignore"):
                new = np.log(scores[b].numpy()[keep].astype(np.float64))  # (k,)
            before = log[where]
            again = np.isfinite(before) & np.isfinite(new)  # patches kept from the last set
            if again.any():
                self._offset[b] = float(np.mean(before[again] - new[again]))
            log[where] = new + self._offset[b]

    def scores(self) -> list[np.ndarray]:
        """Per image (N_b,) float32 scores on the scale of its last set; NaN if never scored."""
        return [
            np.exp(log - offset).astype(np.float32)
            for log, offset in zip(self._log, self._offset, strict=True)
        ]


def _classify(
    model: IPSModel, containers: Sequence[Any], generator: torch.Generator
) -> tuple[Selection, dict[str, Tensor], list[np.ndarray]]:
    """Select, then classify on the selected patches; collect the score of every patch.

    Returns:
        selection ((B, K) each), logits per task, and per image the (N_b,) scores of every
        patch (see ScoreMap).
    """
    score_map = ScoreMap([len(c) for c in containers])
    with torch.inference_mode(), eval_mode(model):
        out = model(containers, generator=generator, observe=score_map)
    selection = Selection(out.selected, out.scores, out.mask)  # (B, K) each
    logits = out.logits
    return selection, logits, score_map.scores()


def _task_outputs(
    logits: dict[str, Tensor], tasks: Sequence[TaskSpec], b: int
) -> tuple[dict[str, list[float]], dict[str, int | list[int]]]:
    probs, labels = {}, {}
    for task in tasks:
        one = logits[task.name][b : b + 1]
        probs[task.name] = probabilities(one, task)[0].reshape(-1).cpu().tolist()
        decided = predictions(one, task)[0].cpu()
        labels[task.name] = decided.tolist() if task.kind == "multilabel" else int(decided)
    return probs, labels


# ---- the public entry point -------------------------------------------------------------------


def predict(
    checkpoint_or_model: IPSModel | str | os.PathLike,
    inputs: Input | Sequence[Input],
    *,
    out_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    heatmaps: bool = True,
    gallery_k: int = 16,
    scale: str = "rank",
    grid: GridConfig | None = None,
    grid_overrides: dict[str, Any] | None = None,
    mask: str | os.PathLike | np.ndarray | None = None,
    split: str | None = None,
    memory_size: int | None = None,
    chunk_size: int | None = None,
    thumbnail_size: int = 1024,
    seed: int = 0,
    on_error: str = "skip",
    progress: bool = False,
) -> list[Prediction]:
    """Predict images, slides or feature bags with a trained model.

    The checkpoint's config decides patch size, channels, normalisation and, unless ``grid``
    says otherwise, how images are cut (``data.grid``); the visiting order of selection is
    seeded, so a call is reproducible.

    Args:
        checkpoint_or_model: a checkpoint path or an IPSModel (moved to ``device``; selection
            overrides are undone afterwards).
        inputs: one or a list of: image / slide files, folders (their supported files, sorted,
            not recursive), tables (``.csv`` / ``.tsv``: their rows' images and masks, see
            ``ips.data.table``), feature-bag files, numpy arrays or tensors (H, W[, C]).
        out_dir: where to write the tables and per-input pictures; None writes nothing.
        device: where the model runs.
        batch_size: images selected and classified together.
        heatmaps: draw heatmap.png, selected.png, gallery.png (needs matplotlib).
        gallery_k: patches in gallery.png (0: no gallery).
        scale: colour scale of the score maps: "linear", "rank" or "log".
        grid: stride, resolution and tissue filter; None: the checkpoint's (the default grid
            for a model object).
        grid_overrides: fields of ``grid`` to change, e.g. ``{"level": 1}`` (a resolution
            field replaces the other resolution fields).
        mask: a tissue mask (file or, for arrays, a boolean array) for every input; a table's
            mask column wins for its rows.
        split: of a table's rows, only those of this split ("train", "val" or "test").
        memory_size: M for inference (default: the checkpoint's).
        chunk_size: I for inference (default: the checkpoint's).
        thumbnail_size: longest side of the thumbnail under the heatmap.
        seed: seeds the visiting order of selection.
        on_error: "skip" (log, set ``error``, go on) or "fail" (raise on the first failure).
        progress: show a progress bar over the inputs.

    Returns:
        One Prediction per input, in input order (folders expanded).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if gallery_k < 0:
        raise ValueError(f"gallery_k must be >= 0, got {gallery_k}")
    if on_error == "fail":  # a mistyped path fails now, not after the inputs before it
        single = isinstance(inputs, (str, os.PathLike, np.ndarray, Tensor))
        for entry in [inputs] if single else inputs:
            if isinstance(entry, (str, os.PathLike)) and not Path(entry).exists():
                raise FileNotFoundError(f"{entry}: no such file or folder")
    if heatmaps and out_dir is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "pictures need: pip install 'iterative-patch-selection[viz]' (or heatmaps=False)"
            ) from err
    overrides = {
        k: v for k, v in (("memory_size", memory_size), ("chunk_size", chunk_size)) if v is not None
    }
    model, trained_grid, restore = _prepare_model(
        checkpoint_or_model, torch.device(device), overrides
    )
    grid = _with_overrides(grid or trained_grid, grid_overrides or {})
    drawing = {
        "heatmaps": heatmaps,
        "gallery_k": gallery_k,
        "scale": scale,
        "thumbnail_size": thumbnail_size,
    }
    out = None if out_dir is None else Path(out_dir)
    try:
        where = None if mask is None or isinstance(mask, np.ndarray) else Path(mask)
        items = _expand(inputs, model.is_features, model.tasks, mask=where, split=split)
        if isinstance(mask, np.ndarray):
            items = [dataclasses.replace(item, mask=mask) for item in items]
        results: list[Prediction] = []
        with _progress(len(items), progress) as bar:
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                results.extend(_predict_batch(model, batch, grid, drawing, out, seed, on_error))
                bar.update(len(batch))
    finally:
        restore()
    if out is not None:
        _write_tables(results, model.tasks, out)
        labelled = [(item, pred) for item, pred in zip(items, results, strict=True) if item.row]
        if any(any(item.row.labels.values()) for item, _ in labelled):  # a task column
            _write_metrics(labelled, model.tasks, out / "metrics.json")
    return results


RESOLUTION = ("level", "downsample", "target_mpp")


def _with_overrides(grid: GridConfig, overrides: dict[str, Any]) -> GridConfig:
    """``grid`` with some fields changed; a resolution field given clears the other two."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(GridConfig)})
    if unknown:
        raise ValueError(f"grid_overrides: unknown grid field(s) {', '.join(unknown)}")
    if any(k in changes for k in RESOLUTION):
        changes = {**{k: None for k in RESOLUTION}, **changes}
    return dataclasses.replace(grid, **changes)


def _predict_batch(
    model: IPSModel,
    batch: Sequence[_Item],
    grid: GridConfig,
    drawing: dict[str, Any],
    out: Path | None,
    seed: int,
    on_error: str,
) -> list[Prediction]:
    """Predict a batch; an input that fails is reported on its own, the others go on."""
    results: dict[int, Prediction] = {}
    opened: list[tuple[int, _Item, Any]] = []
    try:
        for i, item in enumerate(batch):
            try:
                opened.append((i, item, _open(item, model, grid)))
            except Exception as err:
                results[i] = _failed(item, err, on_error)
        groups = [opened] if opened else []
        while groups:
            group = groups.pop(0)
            try:
                generator = torch.Generator().manual_seed(seed)
                selection, logits, scores = _classify(model, [c for *_, c in group], generator)
            except Exception as err:
                if len(group) > 1:  # find which input failed: one at a time
                    groups[:0] = [[entry] for entry in group]
                    continue
                results[group[0][0]] = _failed(group[0][1], err, on_error)
                continue
            for b, (i, item, container) in enumerate(group):
                try:
                    pred = _prediction(model, item, container, selection, logits, scores, b)
                    if out is not None:
                        written = _write_outputs(
                            pred, container, out / pred.name, model.tasks, **drawing
                        )
                        pred = dataclasses.replace(pred, outputs=written)
                    log.debug("%s: %s", pred.name, _headline(pred, model.tasks))
                    results[i] = pred
                except Exception as err:
                    results[i] = _failed(item, err, on_error)
    finally:
        for *_, container in opened:
            container.close()
    return [results[i] for i in range(len(batch))]


def _prediction(
    model: IPSModel,
    item: _Item,
    container: Any,
    selection: Selection,
    logits: dict[str, Tensor],
    all_scores: list[np.ndarray],
    b: int,
) -> Prediction:
    keep = selection.mask[b]
    ids = selection.ids[b][keep].numpy().astype(np.int64)  # (K,) best first
    coords = container.coords
    if coords is None:  # a feature bag without coords
        coords = np.full((len(container), 2), -1, dtype=np.int64)
    probs, labels = _task_outputs(logits, model.tasks, b)
    raw = {t.name: logits[t.name][b].float().reshape(-1).cpu().tolist() for t in model.tasks}
    return Prediction(
        name=item.name,
        path=None if item.path is None else str(item.path),
        probabilities=probs,
        predicted=labels,
        logits=raw,
        selected_ids=ids,
        selected_coords=np.asarray(coords[ids], dtype=np.int64),
        selected_scores=selection.scores[b][keep].numpy().astype(np.float32),
        all_scores=all_scores[b],
        all_coords=np.asarray(coords, dtype=np.int64),
        patch_size=float(container.patch_size_level0),
        image_size=tuple(int(v) for v in container.level0_size),
    )


def _failed(item: _Item, err: Exception, on_error: str) -> Prediction:
    """Report a failed input, or raise with a one-line message naming it (on_error='fail')."""
    label = str(item.path) if item.path is not None else item.name
    message = one_line(err)
    if label not in message and item.name not in message:
        message = f"{label}: {message}"
    if item.row is not None and item.row.where not in message:
        message = f"{item.row.where}: {message}"
    if on_error == "fail":
        if isinstance(err, (ValueError, OSError, ImportError)):
            try:
                renamed = type(err)(message)
            except Exception:  # an exception type with another constructor
                raise err from None
            raise renamed from err
        raise err
    log.warning("skipped %s", message)
    log.debug("%s failed", label, exc_info=err)
    return Prediction(
        name=item.name, path=None if item.path is None else str(item.path), error=message
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="input", dynamic_ncols=True)


# ---- outputs ----------------------------------------------------------------------------------


def _headline(pred: Prediction, tasks: Sequence[TaskSpec]) -> str:
    """``majority 3 (0.91), multi [1, 4]``: the predicted label(s) of every task."""
    parts = []
    for task in tasks:
        label, probs = pred.predicted[task.name], pred.probabilities[task.name]
        if task.kind == "multilabel":
            parts.append(f"{task.name} [{', '.join(_label_names(task, label))}]")
        else:
            name = _class_name(task, label)
            parts.append(f"{task.name} {name} ({_label_probability(task, label, probs):.2f})")
    return ", ".join(parts)


def _class_name(task: TaskSpec, label: int) -> str:
    """A predicted class as the table wrote it: its name, or its index (binary: 0 / 1)."""
    return task.class_name(label) if task.classes is not None else str(label)


def _label_names(task: TaskSpec, decided: Sequence[int]) -> list[str]:
    """The present labels of a multilabel prediction (0/1 per label), by name or index."""
    return [_class_name(task, j) for j, on in enumerate(decided) if on]


def _label_probability(task: TaskSpec, label: int, probs: list[float]) -> float:
    if task.kind == "binary":
        return probs[0] if label == 1 else 1.0 - probs[0]
    return probs[label]


def _write_outputs(
    pred: Prediction,
    container: Any,
    folder: str | os.PathLike,
    tasks: Sequence[TaskSpec],
    *,
    heatmaps: bool = True,
    gallery_k: int = 16,
    scale: str = "rank",
    thumbnail_size: int = 1024,
) -> dict[str, str]:
    """Write the per-input files (see the module docstring) into ``folder``.

    Args:
        pred: a successful prediction.
        container: the PatchSource or FeatureBag it came from (still open).
        tasks: the model's tasks, for the titles.

    Returns:
        kind -> path of each file written.
    """
    from ips import viz

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    buffer = io.BytesIO()
    np.savez(buffer, coords=pred.all_coords, scores=pred.all_scores, selected_ids=pred.selected_ids)
    written["scores"] = str(_write_atomic(folder / "scores.npz", buffer.getvalue()))
    if getattr(container, "coords", None) is None:
        return written  # a feature bag without coords: nowhere to draw
    written["geojson"] = str(
        viz.patches_to_geojson(
            pred.selected_coords,
            pred.selected_scores,
            patch_size=pred.patch_size,
            out=folder / "selected.geojson",
            properties={"image": pred.name},
        )
    )
    if not heatmaps:
        return written
    title = f"{pred.name}: {_headline(pred, tasks)}"
    pixels = isinstance(container, PatchSource)
    if pixels:
        thumbnail = _as_picture(container.thumbnail(thumbnail_size))
    else:  # no pixels: a blank canvas the shape of the patches' extent
        w0, h0 = pred.image_size
        factor = min(1.0, thumbnail_size / max(w0, h0))
        thumbnail = np.full(
            (max(1, round(h0 * factor)), max(1, round(w0 * factor))), 255, dtype=np.uint8
        )
    scored = np.isfinite(pred.all_scores)  # every patch, unless selection skipped one
    if not scored.all():
        log.warning("%s: %d patches got no score", pred.name, int((~scored).sum()))
    where = np.cumsum(scored) - 1  # index among the scored patches
    written["heatmap"] = str(
        viz.heatmap_overlay(
            thumbnail,
            pred.all_coords[scored],
            pred.all_scores[scored],
            patch_size=pred.patch_size,
            image_size=pred.image_size,
            out=folder / "heatmap.png",
            scale=scale,
            title=title,
            alpha=0.5 if pixels else 0.9,
            selected=where[pred.selected_ids[scored[pred.selected_ids]]],
        )
    )
    if not pixels:
        return written
    written["selected"] = str(
        viz.selection_overlay(
            thumbnail,
            pred.selected_coords,
            pred.selected_scores,
            patch_size=pred.patch_size,
            out=folder / "selected.png",
            downsample=pred.image_size[0] / thumbnail.shape[1],
            title=f"{pred.name}: the {len(pred.selected_ids)} selected patches",
            top_labels=min(10, len(pred.selected_ids)),
            scale=scale,
        )
    )
    k = min(gallery_k, len(pred.selected_ids))
    if k > 0:
        patches = container.read(pred.selected_ids[:k])  # (k, C, P, P) at the read resolution
        if patches.shape[1] not in (1, 3):
            patches = patches[:, :1] if patches.shape[1] < 3 else patches[:, :3]
        written["gallery"] = str(
            viz.patch_gallery(
                patches,
                pred.selected_scores[:k],
                out=folder / "gallery.png",
                title=f"{pred.name}: the {k} best selected patches",
                labels=[f"x {x}, y {y}" for x, y in pred.selected_coords[:k]],
            )
        )
    return written


def _as_picture(thumbnail: np.ndarray) -> np.ndarray:
    """(h, w, C) uint8 -> (h, w) grey or (h, w, 3) RGB."""
    channels = thumbnail.shape[2]
    if channels == 1:
        return thumbnail[..., 0]
    return thumbnail[..., :3] if channels >= 3 else thumbnail[..., 0]


def _write_tables(
    results: Sequence[Prediction], tasks: Sequence[TaskSpec], out_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """Write predictions.csv and predictions.jsonl (atomically) into ``out_dir``.

    CSV columns: name, path; per task ``<task>`` (the predicted class: its name where the task
    has class names, else its index; for multilabel tasks the present labels separated by
    ``;``, ``-`` for none, as a labels table writes them) and ``<task>_prob`` (its
    probability), or ``<task>_prob_<j>`` per label for multilabel tasks; num_patches; error.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ["name", "path"]
    for task in tasks:
        if task.kind == "multilabel":
            header += [task.name] + [f"{task.name}_prob_{j}" for j in range(task.num_classes)]
        else:
            header += [task.name, f"{task.name}_prob"]
    header += ["num_patches", "error"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for pred in results:
        row: list[Any] = [pred.name, pred.path or ""]
        for task in tasks:
            width = task.num_classes if task.kind == "multilabel" else 1
            if not pred.ok:
                row += [""] * (1 + width)
                continue
            label, probs = pred.predicted[task.name], pred.probabilities[task.name]
            if task.kind == "multilabel":
                row.append(";".join(_label_names(task, label)) or "-")
                row += [_csv_number(p) for p in probs]
            else:
                row += [
                    _class_name(task, label),
                    _csv_number(_label_probability(task, label, probs)),
                ]
        row += [len(pred.all_scores) if pred.ok else "", pred.error or ""]
        writer.writerow(row)
    lines = [json.dumps(_record(pred, tasks), allow_nan=False) for pred in results]
    csv_path = _write_atomic(out_dir / "predictions.csv", text.getvalue().encode("utf-8"))
    jsonl_path = _write_atomic(
        out_dir / "predictions.jsonl", "".join(f"{line}\n" for line in lines).encode("utf-8")
    )
    return csv_path, jsonl_path


def _write_metrics(
    labelled: Sequence[tuple[_Item, Prediction]], tasks: Sequence[TaskSpec], path: Path
) -> Path:
    """metrics.json: the metrics of the predictions of table rows against their labels (as
    `ips eval` computes them; rows whose label of a task is empty do not count for it)."""
    from ips.train import MetricTracker, nest_metrics

    tracker = MetricTracker(tasks)
    counts = {task.name: 0 for task in tasks}
    failed = 0
    for item, pred in labelled:
        if not pred.ok:
            failed += 1
            continue
        targets = {k: v.unsqueeze(0) for k, v in encode_labels(item.row, tasks).items()}
        logits = {t.name: _logits(pred, t) for t in tasks}
        loss = float(compute_loss(logits, targets, tasks)[0])
        tracker.update(logits, targets, loss)
        for task in tasks:
            counts[task.name] += int(bool(item.row.labels.get(task.name)))
    metrics = {
        "images": len(labelled) - failed,
        "failed": failed,
        "labelled": counts,
        "metrics": nest_metrics(tracker.compute()) if len(labelled) > failed else {},
    }
    text = json.dumps(_json_safe(metrics), indent=1, allow_nan=False)
    return _write_atomic(path, (text + "\n").encode("utf-8"))


def _json_safe(value: Any) -> Any:
    """NaN and inf (an AUC of one class, say) as null, in nested dicts."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float):
        return _finite(value)
    return value


def _logits(pred: Prediction, task: TaskSpec) -> Tensor:
    """(1, classes) or (1,) for binary: the logits of one prediction as the heads shape them."""
    values = torch.tensor(pred.logits[task.name], dtype=torch.float32)
    return values.reshape(1) if task.kind == "binary" else values.reshape(1, -1)


def _csv_number(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else ""


def _named(pred: Prediction, tasks: Sequence[TaskSpec]) -> dict[str, Any]:
    """Per task the predicted class name (multilabel: the present labels' names)."""
    out: dict[str, Any] = {}
    for task in tasks:
        if task.name not in pred.predicted:
            continue
        label = pred.predicted[task.name]
        out[task.name] = (
            _label_names(task, label) if task.kind == "multilabel" else _class_name(task, label)
        )
    return out


def _record(pred: Prediction, tasks: Sequence[TaskSpec]) -> dict[str, Any]:
    """Everything about a prediction as JSON-safe values (NaN and inf become null)."""
    coords_known = bool(len(pred.all_coords)) and bool((pred.all_coords >= 0).all())
    selected = [
        {
            "rank": rank,
            "id": int(i),
            "x": int(xy[0]) if coords_known else None,
            "y": int(xy[1]) if coords_known else None,
            "score": _finite(s),
        }
        for rank, (i, xy, s) in enumerate(
            zip(pred.selected_ids, pred.selected_coords, pred.selected_scores, strict=True), 1
        )
    ]
    return {
        "name": pred.name,
        "path": pred.path,
        "probabilities": {k: [_finite(p) for p in v] for k, v in pred.probabilities.items()},
        "predicted": pred.predicted,
        "labels": _named(pred, tasks),
        "logits": {k: [_finite(v) for v in values] for k, values in pred.logits.items()},
        "num_patches": len(pred.all_scores),
        "patch_size": _finite(pred.patch_size),
        "image_size": list(pred.image_size),
        "selected": selected,
        "error": pred.error,
        "outputs": pred.outputs,
    }


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write to a temporary file next to ``path``, then rename it over ``path``."""
    with atomic_write(path) as fh:
        fh.write(data)
    return path


# ---- the command ------------------------------------------------------------------------------


def run_predict(
    checkpoint: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    **options: Any,
) -> dict[str, Any]:
    """``ips predict``: predict, write everything into ``out_dir``, return a summary.

    Args:
        checkpoint: the checkpoint file.
        inputs: files and folders.
        out_dir: the output folder.
        **options: keyword arguments of ``predict``.

    Returns:
        {"out_dir", "predictions_csv", "predictions_jsonl", "inputs", "succeeded",
        "failed": [{"name", "path", "error"}], "metrics_json" (None unless a table gave
        labels), "seconds"}.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
    out = Path(out_dir)
    results = predict(checkpoint, list(inputs), out_dir=out, **options)
    failed = [{"name": p.name, "path": p.path, "error": p.error} for p in results if not p.ok]
    summary = {
        "out_dir": str(out),
        "predictions_csv": str(out / "predictions.csv"),
        "predictions_jsonl": str(out / "predictions.jsonl"),
        "inputs": len(results),
        "succeeded": len(results) - len(failed),
        "failed": failed,
        "metrics_json": str(out / "metrics.json") if (out / "metrics.json").is_file() else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info(
        "predicted %d of %d inputs in %.1f s; results in %s",
        summary["succeeded"],
        summary["inputs"],
        summary["seconds"],
        out,
    )
    return summary
