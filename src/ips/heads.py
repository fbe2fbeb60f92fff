"""Task heads and losses: one linear head per task, each on its own query token.

Logits shapes: multiclass (B, K), multilabel (B, K), binary (B,).
Targets: multiclass (B,) class indices, multilabel (B, K) in {0, 1}, binary (B,) in {0, 1}.
Unknown targets (a table's empty cell): -1 for multiclass, NaN for binary and multilabel; they
add nothing to the loss (see `known`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ips.config import TaskSpec
from ips.errors import InputError


class TaskHeads(nn.Module):
    """Linear heads; task t reads query token t."""

    def __init__(self, tasks: Sequence[TaskSpec], *, embed_dim: int):
        super().__init__()
        self.tasks = tuple(tasks)
        self.heads = nn.ModuleDict({t.name: nn.Linear(embed_dim, t.num_outputs) for t in tasks})

    def forward(self, pooled: Tensor) -> dict[str, Tensor]:
        """Args: pooled: (B, T, D). Returns: logits per task name."""
        if pooled.shape[1] != len(self.tasks):
            raise InputError(f"expected {len(self.tasks)} task tokens, got {pooled.shape[1]}")
        out = {}
        for t, task in enumerate(self.tasks):
            logits = self.heads[task.name](pooled[:, t])  # (B, K)
            out[task.name] = logits.squeeze(-1) if task.kind == "binary" else logits
        return out


def known(target: Tensor, task: TaskSpec) -> Tensor:
    """(B,) True where the target of an image is known (not -1 or NaN)."""
    if task.kind == "multiclass":
        return target >= 0
    missing = torch.isnan(target.float())
    return ~missing.reshape(len(target), -1).any(1)


def task_loss(logits: Tensor, target: Tensor, task: TaskSpec) -> Tensor:
    """Mean loss of one task over the images whose target is known, from logits; 0 (still
    connected to the logits) when none is."""
    keep = known(target, task)
    if not bool(keep.all()):
        if not bool(keep.any()):
            return logits.float().sum() * 0.0
        logits, target = logits[keep], target[keep]
    if task.kind == "multiclass":
        return F.cross_entropy(logits.float(), target.long())
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def compute_loss(
    logits: Mapping[str, Tensor], targets: Mapping[str, Tensor], tasks: Sequence[TaskSpec]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (mean over tasks, a task without known targets counting 0) and the loss of
    each task."""
    per_task = {}
    for task in tasks:
        if task.name not in targets:
            raise KeyError(f"targets lack task {task.name!r}; got {sorted(targets)}")
        per_task[task.name] = task_loss(logits[task.name], targets[task.name], task)
    total = torch.stack(list(per_task.values())).mean()
    return total, per_task


def probabilities(logits: Tensor, task: TaskSpec) -> Tensor:
    """Softmax for multiclass, sigmoid for binary and multilabel."""
    return logits.float().softmax(-1) if task.kind == "multiclass" else logits.float().sigmoid()


def predictions(logits: Tensor, task: TaskSpec) -> Tensor:
    """Class index (multiclass) or 0/1 decisions at probability 0.5."""
    if task.kind == "multiclass":
        return logits.argmax(-1)
    return (logits > 0).long()
