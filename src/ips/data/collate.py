"""Batching bags of patches: stack when every image has N patches, else pad with a mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


def collate_patches(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset items ``{"patches", "targets", "index"}``.

    Returns:
        ``patches``: (B, N, ...) tensor when every image has the same N; (B, N_max, ...)
        zero-padded tensor with ``mask`` (B, N_max) True for real patches when N differs; a list
        of B containers when the items are lazy sources (not tensors).
        ``mask``: (B, N) bool or None. ``targets``: task -> stacked (B, ...) tensor.
        ``index``: (B,) dataset indices. ``skipped``: items that failed to load
        (``{"index", "error"}``, see ``SkipErrors``), left out of the batch.
    """
    skipped = [item for item in batch if "error" in item]
    batch = [item for item in batch if "error" not in item]
    if not batch:
        return {
            "patches": [],
            "mask": None,
            "targets": {},
            "index": torch.zeros(0, dtype=torch.long),
            "skipped": skipped,
        }
    items = [item["patches"] for item in batch]
    mask = None
    if all(isinstance(p, Tensor) for p in items):
        lengths = [p.shape[0] for p in items]
        if len(set(lengths)) == 1:
            patches: Tensor | list[Any] = torch.stack(items)
        else:
            n = max(lengths)
            patches = items[0].new_zeros((len(items), n, *items[0].shape[1:]))
            mask = torch.zeros(len(items), n, dtype=torch.bool)
            for b, p in enumerate(items):
                patches[b, : len(p)] = p
                mask[b, : len(p)] = True
    else:
        patches = list(items)
    targets = {
        name: torch.stack([torch.as_tensor(item["targets"][name]) for item in batch])
        for name in batch[0]["targets"]
    }
    index = torch.tensor([int(item.get("index", i)) for i, item in enumerate(batch)])
    return {
        "patches": patches,
        "mask": mask,
        "targets": targets,
        "index": index,
        "skipped": skipped,
    }


class SkipErrors(Dataset):
    """Wraps a dataset so that an item that fails to load becomes ``{"index", "error"}``
    (one line naming the item and the reason) instead of ending the run; ``collate_patches``
    leaves such items out and reports them as ``skipped``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # grid_shape, foreground_patches, ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.dataset[i]
        except Exception as err:  # any reader failure: corrupt tile, vanished file, ...
            reason = " ".join(str(err).split()) or type(err).__name__
            return {"index": i, "error": f"item {i}: {reason}"}
