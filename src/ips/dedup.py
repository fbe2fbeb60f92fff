"""Identical patches: content keys, groups of copies, and encoding each distinct patch once.

In eval mode an encoder treats patches independently, so copies of a patch (blank background,
glass, padding) have identical embeddings: encoding one of each is exact. During selection the
same keys let at most one copy of a patch compete for the memory (``selection.distinct``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

Encode = Callable[[Tensor], Tensor]  # (n, ...) patches -> (n, D) embeddings

_KEY_WEIGHTS: dict[tuple[int, str], Tensor] = {}


def content_keys(raw: Tensor, valid: Tensor) -> Tensor:
    """A 64-bit key of each patch's content, laid out as valid (B, k); padded entries get
    distinct keys of their own. Equal content gives equal keys within a process.

    Args:
        raw: (n_valid, ...) patches (integer or float).
        valid: (B, k) bool.

    Returns:
        (B, k) int64 on the CPU.
    """
    keys = torch.iinfo(torch.int64).min + torch.arange(valid.numel()).view(valid.shape)
    if raw.shape[0]:  # (a chunk may hold padding alone)
        keys[valid] = row_keys(raw.flatten(1))
    return keys


def row_keys(flat: Tensor) -> Tensor:
    """(n,) int64 on the CPU: a 64-bit key of each row of flat (n, W); equal rows, equal keys."""
    if flat.device.type == "cpu":  # hashing the bytes of each row: a few ms for 1600 patches
        rows = flat.contiguous().numpy()
        return torch.tensor([hash(row.tobytes()) for row in rows], dtype=torch.int64)
    # on an accelerator: fixed odd multipliers, int64 products wrap around
    flat = flat.float().view(torch.int32) if flat.is_floating_point() else flat
    width = flat.shape[1]
    key = (width, str(flat.device))
    if key not in _KEY_WEIGHTS:
        g = torch.Generator().manual_seed(width)
        weights = torch.randint(1, 2**62, (width,), generator=g) * 2 + 1
        _KEY_WEIGHTS[key] = weights.to(flat.device)
    return (flat.long() * _KEY_WEIGHTS[key]).sum(1).cpu()


def identical_groups(patches: Tensor, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Group identical patches, exactly (equal bytes).

    Args:
        patches: (n, ...).
        keys: (n,) their `row_keys` (of the flattened patches), if already known.

    Returns:
        first: (u,) index of the first member of each group, in order of appearance;
        inverse: (n,) the group of each patch, so that ``patches[first][inverse]`` equals
        ``patches``. Both on the patches' device.
    """
    n = patches.shape[0]
    flat = patches.reshape(n, -1)
    if flat.device.type != "cpu":
        _, inverse = torch.unique(flat, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), n, device=flat.device)
        first.scatter_reduce_(0, inverse, torch.arange(n, device=flat.device), "amin")
        return first, inverse
    # group by key (sorting n integers), then check the groups byte for byte: a key shared by
    # different rows sends them to an exact grouping by a dict of row bytes
    keys = row_keys(flat) if keys is None else keys.cpu()
    _, firsts, groups = np.unique(keys.numpy(), return_index=True, return_inverse=True)
    order = np.argsort(firsts)  # groups numbered in order of appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first = torch.from_numpy(firsts[order])
    inverse = torch.from_numpy(rank[groups.reshape(-1)])
    if len(first) == n or torch.equal(flat[first][inverse], flat):
        return first, inverse
    return _groups_by_bytes(flat)


def _groups_by_bytes(flat: Tensor) -> tuple[Tensor, Tensor]:
    """`identical_groups` of the rows of flat (n, W) on the CPU by a dict of their bytes."""
    groups: dict[bytes, int] = {}
    inverse_list: list[int] = []
    first_list: list[int] = []
    for i, row in enumerate(flat.contiguous().numpy()):
        group = groups.setdefault(row.tobytes(), len(groups))
        if group == len(first_list):
            first_list.append(i)
        inverse_list.append(group)
    return torch.tensor(first_list, dtype=torch.long), torch.tensor(inverse_list, dtype=torch.long)


def duplicates(keys: Tensor, valid: Tensor) -> Tensor:
    """(B, K) True for every valid entry whose key an earlier entry of its row already has."""
    sorted_keys, order = keys.sort(dim=1, stable=True)
    repeated = sorted_keys[:, 1:] == sorted_keys[:, :-1]
    out = torch.zeros_like(valid)
    out.scatter_(1, order[:, 1:], repeated)
    return out & valid


def encode_batched(encode: Encode, patches: Tensor, batch_size: int | None = None) -> Tensor:
    """Encode (n, ...) patches in micro-batches of ``batch_size``: (n, D)."""
    n = patches.shape[0]
    step = max(1, n if batch_size is None else batch_size)
    parts = [encode(patches[i : i + step]) for i in range(0, n, step)] or [encode(patches)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def encode_distinct(
    encode: Encode,
    patches: Tensor,
    batch_size: int | None = None,
    keys: Tensor | None = None,
) -> Tensor:
    """Encode each distinct patch once and share its embedding with its copies: (n, D).

    Exact only where the encoder treats patches independently (eval mode): then identical
    patches (blank background, glass, padding) have identical embeddings.

    Args:
        keys: (n,) the patches' `row_keys`, if already known (``selection.distinct``).
    """
    first, inverse = identical_groups(patches, keys)
    if len(first) == patches.shape[0]:
        return encode_batched(encode, patches, batch_size)
    emb = encode_batched(encode, patches[first], batch_size)  # (u, D)
    return emb[inverse.to(emb.device)]
