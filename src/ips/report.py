"""Writing predictions: the tables of a run of ``ips predict`` and each input's files.

``write_tables`` writes ``predictions.csv`` and ``predictions.jsonl``, ``write_metrics``
``metrics.json`` (predictions against a table's labels), ``write_input`` an input's
``scores.npz``, ``selected.geojson``, ``heatmap.png``, ``selected.png`` and ``gallery.png``
(see ``ips.predict``). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ips.config import TaskSpec
from ips.data.table import Row, encode_labels
from ips.files import write_atomically
from ips.heads import compute_loss
from ips.sources import PatchSource

if TYPE_CHECKING:
    from ips.predict import Prediction

log = logging.getLogger(__name__)


def headline(pred: Prediction, tasks: Sequence[TaskSpec]) -> str:
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


def write_input(
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

    folder = Path(folder)  # made by the first write, whose error names the file
    written: dict[str, str] = {}
    buffer = io.BytesIO()
    np.savez(buffer, coords=pred.all_coords, scores=pred.all_scores, selected_ids=pred.selected_ids)
    written["scores"] = str(write_atomically(folder / "scores.npz", buffer.getvalue()))
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
    title = f"{pred.name}: {headline(pred, tasks)}"
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


def write_tables(
    results: Sequence[Prediction], tasks: Sequence[TaskSpec], out_dir: str | os.PathLike
) -> tuple[Path, Path]:
    """Write predictions.csv and predictions.jsonl (atomically) into ``out_dir``.

    CSV columns: name, path; per task ``<task>`` (the predicted class: its name where the task
    has class names, else its index; for multilabel tasks the present labels separated by
    ``;``, ``-`` for none, as a labels table writes them) and ``<task>_prob`` (its
    probability), or ``<task>_prob_<j>`` per label for multilabel tasks; num_patches; error.
    """
    out_dir = Path(out_dir)
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
    csv_path = write_atomically(out_dir / "predictions.csv", text.getvalue())
    jsonl_path = write_atomically(
        out_dir / "predictions.jsonl", "".join(f"{line}\n" for line in lines)
    )
    return csv_path, jsonl_path


def write_metrics(
    labelled: Sequence[tuple[Row, Prediction]], tasks: Sequence[TaskSpec], path: Path
) -> Path:
    """metrics.json: the metrics of the predictions of table rows against the rows' labels (as
    `ips eval` computes them; rows whose label of a task is empty do not count for it)."""
    from ips.metrics import MetricTracker, nest_metrics

    tracker = MetricTracker(tasks)
    counts = {task.name: 0 for task in tasks}
    failed = 0
    for row, pred in labelled:
        if not pred.ok:
            failed += 1
            continue
        targets = {k: v.unsqueeze(0) for k, v in encode_labels(row, tasks).items()}
        logits = {t.name: _logits(pred, t) for t in tasks}
        loss = float(compute_loss(logits, targets, tasks)[0])
        tracker.update(logits, targets, loss)
        for task in tasks:
            counts[task.name] += int(bool(row.labels.get(task.name)))
    metrics = {
        "images": len(labelled) - failed,
        "failed": failed,
        "labelled": counts,
        "metrics": nest_metrics(tracker.compute()) if len(labelled) > failed else {},
    }
    text = json.dumps(_json_safe(metrics), indent=1, allow_nan=False)
    return write_atomically(path, text + "\n")


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
