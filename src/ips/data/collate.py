"""Batching bags of patches: stack when every image has N patches, else pad with a mask."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def collate_patches(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset items ``{"patches", "targets", "index"}``.

    Returns:
        ``patches``: (B, N, ...) tensor when every image has the same N; (B, N_max, ...)
        zero-padded tensor with ``mask`` (B, N_max) True for real patches when N differs; a list
        of B containers when the items are lazy sources (not tensors).
        ``mask``: (B, N) bool or None. ``targets``: task -> stacked (B, ...) tensor.
        ``index``: (B,) dataset indices.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
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
    return {"patches": patches, "mask": mask, "targets": targets, "index": index}
