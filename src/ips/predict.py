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

import copy
import dataclasses
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ips import progress as bars
from ips import report
from ips.config import GridConfig, TaskSpec, replace_fields
from ips.data.feature_bags import FEATURE_SUFFIXES, FeatureBag, open_feature_bag
from ips.data.table import TABLE_SUFFIXES, read_table, split_rows
from ips.data.table import Row as TableRow
from ips.errors import InputError, MissingFileError, one_line
from ips.heads import predictions, probabilities
from ips.model import IPSModel, load_model_and_config
from ips.selection import ScoreMap, Selection, eval_mode
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
    mask: Path | np.ndarray | None = None  # its tissue mask (a table's, or the call's)
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
        raise InputError("no inputs to predict (empty list, or folders without supported files)")
    items, seen = [], set()
    for name, file, array, row in named:
        base = re.sub(r"[^\w.-]+", "_", name).strip("._") or "input"
        unique, n = base, 1
        while unique in seen:
            n += 1
            unique = f"{base}-{n}"
        seen.add(unique)
        where = row.mask if row is not None and row.mask is not None else mask
        items.append(_Item(unique, file, array, where, row))
    return items


def _open(item: _Item, model: IPSModel, grid: GridConfig) -> PatchSource | FeatureBag:
    """Open one input as a patch container the model can read."""
    cfg = model.model_config
    label = item.row.where if item.row is not None else str(item.path or item.name)
    is_bag = item.path is not None and item.path.suffix.lower() in FEATURE_SUFFIXES
    if model.is_features:
        if not is_bag:
            raise InputError(
                f"{label}: the model reads precomputed features (encoder 'features'); "
                f"give feature bags ({', '.join(sorted(FEATURE_SUFFIXES))}), not images"
            )
        assert item.path is not None  # is_bag
        bag = open_feature_bag(item.path)
        if bag.feature_dim != cfg.feature_dim:
            bag.close()
            raise InputError(
                f"{label}: features have width F={bag.feature_dim}, "
                f"the model expects F={cfg.feature_dim} (model.feature_dim)"
            )
        return bag
    if is_bag:
        raise InputError(
            f"{label}: a feature bag, but the model reads pixels (encoder {cfg.encoder!r})"
        )
    source: PatchSource
    if item.array is not None:
        kwargs = grid_options(grid, item.mask, name=label)
        files_only = sorted({"level", "downsample", "target_mpp"} & set(kwargs))
        if files_only:
            raise InputError(f"{label}: {', '.join(files_only)} apply to files, not to arrays")
        source = ArraySource(
            item.array,
            patch_size=cfg.patch_size,
            channels_last=_channels_last(item.array),
            name=item.name,
            **kwargs,
        )
    else:
        assert item.path is not None  # an item is a file or an array
        source = open_source(item.path, patch_size=cfg.patch_size, grid=grid, mask=item.mask)
    if source.channels != cfg.in_channels:
        source.close()
        raise InputError(
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
) -> tuple[IPSModel, GridConfig]:
    """The model on ``device`` with selection overrides, and the grid it was trained with (a
    checkpoint's ``data.grid``; the default grid for a model object). A model object the
    caller passed keeps its own selection settings: overrides go to a shallow copy, which
    shares its modules and weights."""
    if isinstance(checkpoint_or_model, (str, os.PathLike)):
        model, config = load_model_and_config(checkpoint_or_model, map_location="cpu", **overrides)
        return model.to(device), config.data.grid
    if not isinstance(checkpoint_or_model, IPSModel):
        raise TypeError(
            "checkpoint_or_model must be an IPSModel or a checkpoint path, "
            f"got {type(checkpoint_or_model).__name__}"
        )
    model = checkpoint_or_model
    if overrides:
        model = copy.copy(model)  # the same modules; its own selection settings
        model.selection_config = replace_fields(model.config, **overrides).selection
    return model.to(device), GridConfig()


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
        raise InputError(f"scale must be one of {SCALES}, got {scale!r}")
    if on_error not in ON_ERROR:
        raise InputError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if gallery_k < 0:
        raise InputError(f"gallery_k must be >= 0, got {gallery_k}")
    if on_error == "fail":  # a mistyped path fails now, not after the inputs before it
        single = isinstance(inputs, (str, os.PathLike, np.ndarray, Tensor))
        entries: Sequence[Any] = [inputs] if single else list(inputs)  # type: ignore[arg-type]
        for entry in entries:
            if isinstance(entry, (str, os.PathLike)) and not Path(entry).exists():
                raise MissingFileError(f"{entry}: no such file or folder")
    overrides = {
        k: v for k, v in (("memory_size", memory_size), ("chunk_size", chunk_size)) if v is not None
    }
    model, trained_grid = _prepare_model(checkpoint_or_model, torch.device(device), overrides)
    grid = _with_overrides(grid or trained_grid, grid_overrides or {})
    drawing = {
        "heatmaps": heatmaps,
        "gallery_k": gallery_k,
        "scale": scale,
        "thumbnail_size": thumbnail_size,
    }
    out = None if out_dir is None else Path(out_dir)
    where = None if mask is None or isinstance(mask, np.ndarray) else Path(mask)
    items = _expand(inputs, model.is_features, model.tasks, mask=where, split=split)
    if isinstance(mask, np.ndarray):
        items = [dataclasses.replace(item, mask=mask) for item in items]
    results: list[Prediction] = []
    with bars.bar(len(items), "predict", unit="input", show=progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            results.extend(_predict_batch(model, batch, grid, drawing, out, seed, on_error))
            bar.update(len(batch))
    if out is not None:
        report.write_tables(results, model.tasks, out)
        labelled = [(i.row, pred) for i, pred in zip(items, results, strict=True) if i.row]
        if any(any(row.labels.values()) for row, _ in labelled):  # a task column
            report.write_metrics(labelled, model.tasks, out / "metrics.json")
    return results


RESOLUTION = ("level", "downsample", "target_mpp")


def _with_overrides(grid: GridConfig, overrides: dict[str, Any]) -> GridConfig:
    """``grid`` with some fields changed; a resolution field given clears the other two."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(GridConfig)})
    if unknown:
        raise InputError(f"grid_overrides: unknown grid field(s) {', '.join(unknown)}")
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
                        written = report.write_input(
                            pred, container, out / pred.name, model.tasks, **drawing
                        )
                        pred = dataclasses.replace(pred, outputs=written)
                    log.debug("%s: %s", pred.name, report.headline(pred, model.tasks))
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
        image_size=(int(container.level0_size[0]), int(container.level0_size[1])),
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
        raise MissingFileError(f"{checkpoint}: checkpoint not found")
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
