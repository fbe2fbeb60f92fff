"""Metrics of a run: per-task accuracy, exact match, ROC AUC, the loss, selection diagnostics.

`MetricTracker` accumulates logits and targets over an epoch (images whose label is unknown
count for no task metric); `main_metric` is the number that picks ``best.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ips.aggregation import masked_mean_entropy
from ips.heads import known, predictions, probabilities

MAIN_METRIC = "val_main"


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if a class
    is absent."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class MetricTracker:
    """Accumulates logits and targets over an epoch and reports per-task metrics."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.logits: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
        self.targets: dict[str, list[Tensor]] = {t.name: [] for t in tasks}
        self.losses: list[float] = []
        self.sizes: list[int] = []
        self.extra: dict[str, list[float]] = {}

    def update(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], loss: float):
        for t in self.tasks:
            self.logits[t.name].append(logits[t.name].detach().float().cpu())
            self.targets[t.name].append(targets[t.name].detach().cpu())
        size = len(next(iter(targets.values())))
        self.losses.append(loss * size)
        self.sizes.append(size)

    def add(self, name: str, values: Iterable[float]) -> None:
        self.extra.setdefault(name, []).extend(float(v) for v in values)

    @classmethod
    def merged(cls, trackers: Sequence[MetricTracker]) -> MetricTracker:
        """One tracker holding the updates of ``trackers`` (e.g. one per process), in order."""
        out = cls(trackers[0].tasks)
        for tracker in trackers:
            for name in out.logits:
                out.logits[name] += tracker.logits[name]
                out.targets[name] += tracker.targets[name]
            out.losses += tracker.losses
            out.sizes += tracker.sizes
            for name, values in tracker.extra.items():
                out.add(name, values)
        return out

    def state(self) -> dict[str, Any]:
        """The updates so far as plain data (tensors, lists, numbers), e.g. for a checkpoint."""
        return {
            "logits": {k: list(v) for k, v in self.logits.items()},
            "targets": {k: list(v) for k, v in self.targets.items()},
            "losses": list(self.losses),
            "sizes": list(self.sizes),
            "extra": {k: list(v) for k, v in self.extra.items()},
        }

    @classmethod
    def from_state(cls, tasks, state: Mapping[str, Any]) -> MetricTracker:
        """A tracker holding the updates of ``state`` (from `state`)."""
        out = cls(tasks)
        for name in out.logits:
            out.logits[name] = list(state["logits"][name])
            out.targets[name] = list(state["targets"][name])
        out.losses = [float(v) for v in state["losses"]]
        out.sizes = [int(v) for v in state["sizes"]]
        out.extra = {str(k): [float(x) for x in v] for k, v in state["extra"].items()}
        return out

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.sizes:
            out["loss"] = sum(self.losses) / sum(self.sizes)
        for task in self.tasks:
            if not self.logits[task.name]:
                continue
            logits = torch.cat(self.logits[task.name])
            target = torch.cat(self.targets[task.name])
            keep = known(target, task)  # images whose label is known for this task
            if not bool(keep.any()):
                continue
            logits, target = logits[keep], target[keep]
            pred = predictions(logits, task)
            if task.kind == "multiclass":
                out[f"{task.name}/accuracy"] = (pred == target.long()).float().mean().item()
            elif task.kind == "multilabel":
                hits = pred == target.long()
                out[f"{task.name}/exact_match"] = hits.all(1).float().mean().item()
                out[f"{task.name}/label_accuracy"] = hits.float().mean().item()
            else:
                prob = probabilities(logits, task).numpy()
                out[f"{task.name}/auc"] = roc_auc(prob, target.numpy())
                out[f"{task.name}/accuracy"] = (pred == target.long()).float().mean().item()
        for name, values in self.extra.items():
            out[name] = float(np.mean(values)) if values else float("nan")
        return out


def main_metric(metrics: Mapping[str, float], tasks) -> float:
    """The number that picks the best checkpoint: mean of each task's headline metric."""
    keys = {"multiclass": "accuracy", "multilabel": "exact_match", "binary": "auc"}
    values = [metrics.get(f"{t.name}/{keys[t.kind]}", float("nan")) for t in tasks]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else -metrics.get("loss", float("inf"))


def selection_diagnostics(
    dataset: Dataset, index: Tensor, selected: Tensor, mask: Tensor, attention: Tensor
) -> dict[str, list[float]]:
    """Per-image signals that catch selection collapse.

    ``foreground_share``: share of the kept patches that hold an object (datasets that know,
    e.g. Megapixel MNIST); ``attention_entropy``: entropy of the pooling attention over the
    kept patches, as a fraction of its maximum log(K) (1 = uniform, 0 = one patch).
    """
    out: dict[str, list[float]] = {}
    weights = attention.detach().float().unsqueeze(1)  # (B, 1, T, K)
    entropy = masked_mean_entropy(weights, mask.to(weights.device)).cpu()
    k = mask.sum(1).clamp_min(2).float()
    out["attention_entropy"] = (entropy / k.log()).tolist()
    foreground = getattr(dataset, "foreground_patches", None)
    if foreground is not None:
        shares = []
        for b, i in enumerate(index.tolist()):
            fg = torch.from_numpy(np.asarray(foreground(i)))
            ids = selected[b][mask[b]]
            shares.append(fg[ids].float().mean().item() if len(ids) else 0.0)
        out["foreground_share"] = shares
    return out


def nest_metrics(metrics: Mapping[str, float]) -> dict[str, Any]:
    """``{"majority/accuracy": 0.9, "loss": 1.2}`` -> ``{"majority": {"accuracy": 0.9},
    "loss": 1.2}``."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if "/" in key:
            task, name = key.split("/", 1)
            out.setdefault(task, {})[name] = value
        else:
            out[key] = value
    return out
