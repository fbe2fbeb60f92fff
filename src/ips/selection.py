"""Iterative patch selection: keep the M best-scoring of N patches, streaming chunks of I.

Letters: B images, N patches per image, M memory size, I chunk size, D embedding width.

Patches can live anywhere that can be indexed: a tensor (B, N, ...) on any device, or a
sequence of B per-image containers (tensors, numpy arrays, or lazy sources with ``read(ids)``)
of possibly different lengths. Only the first M patches and then one chunk of I at a time are
read and moved to the encoder's device, so memory depends on M and I, not on N.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

Encode = Callable[[Tensor], Tensor]  # (n, ...) patches -> (n, D) embeddings
Score = Callable[[Tensor, Tensor, Tensor], Tensor]  # emb (B, K, D), ids, valid (B, K) -> (B, K)
Observer = Callable[[Tensor, Tensor, Tensor], None]  # ids, scores, valid (B, K)


class Selection(NamedTuple):
    """The patches kept by selection, best first.

    ids: (B, K) original patch indices, K = min(M, N).
    scores: (B, K) selection score of each kept patch (0 where padded).
    mask: (B, K) True for real patches (False only for images with fewer than K patches).
    """

    ids: Tensor
    scores: Tensor
    mask: Tensor


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's previous mode on exit (also on
    an exception)."""
    previous = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in previous:
            m.training = training


class PatchStore:
    """Uniform read access to a batch of patch containers.

    Args:
        patches: a tensor (B, N, ...) or a sequence of B containers supporting ``len`` and
            indexing (or ``read``) with an integer array, returning (n, ...).
        mask: (B, N) bool, True for real patches; only for a padded tensor.
    """

    def __init__(self, patches: Tensor | Sequence[Any], mask: Tensor | None = None):
        self.patches = patches
        if isinstance(patches, Tensor):
            if patches.dim() < 3:
                raise ValueError(
                    f"patches must be (B, N, ...) with per-patch dims, got {tuple(patches.shape)}"
                )
            self.batch_size, self.num_patches = patches.shape[:2]
            if mask is not None:
                if tuple(mask.shape) != (self.batch_size, self.num_patches):
                    raise ValueError(
                        f"mask must be (B, N) = {(self.batch_size, self.num_patches)}, "
                        f"got {tuple(mask.shape)}"
                    )
                mask = mask.to(device="cpu", dtype=torch.bool)
            self.mask = mask
            self.lengths = (
                mask.sum(1)
                if mask is not None
                else torch.full((self.batch_size,), self.num_patches)
            )
        else:
            if mask is not None:
                raise ValueError("mask is only for a padded tensor; a sequence carries lengths")
            if len(patches) == 0:
                raise ValueError("patches: got an empty batch")
            self.batch_size = len(patches)
            self.lengths = torch.tensor([len(p) for p in patches])
            self.num_patches = int(self.lengths.max())
            self.mask = None
        if int(self.lengths.min()) == 0:
            raise ValueError("every image needs at least one patch, got an image with none")

    def valid(self, ids: Tensor) -> Tensor:
        """(B, k) bool: which ids are real patches."""
        if self.mask is not None:
            return self.mask.gather(1, ids)
        return ids < self.lengths[:, None]

    def read(self, ids: Tensor, valid: Tensor) -> Tensor:
        """Read the valid patches of ids (B, k), flattened in (b, k) order: (n_valid, ...)."""
        if isinstance(self.patches, Tensor):
            rows = torch.arange(self.batch_size)[:, None].expand_as(ids)
            where = self.patches.device
            return self.patches[rows[valid].to(where), ids[valid].to(where)]
        parts = []
        for b, container in enumerate(self.patches):
            wanted = ids[b][valid[b]]
            if len(wanted):
                parts.append(_read(container, wanted))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _read(container: Any, ids: Tensor) -> Tensor:
    if isinstance(container, Tensor):
        return container[ids.to(container.device)]
    index = ids.numpy()
    out = container.read(index) if hasattr(container, "read") else container[index]
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
    return out


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Move host patches to the device, through pinned memory on CUDA."""
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


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
    flat = raw.reshape(raw.shape[0], -1)
    if flat.device.type == "cpu":  # hashing the bytes of each row: a few ms for 1600 patches
        rows = flat.contiguous().numpy()
        hashed = torch.tensor([hash(row.tobytes()) for row in rows], dtype=torch.int64)
    else:  # on an accelerator: fixed odd multipliers, int64 products wrap around
        flat = flat.float().view(torch.int32) if flat.is_floating_point() else flat
        width = flat.shape[1]
        key = (width, str(flat.device))
        if key not in _KEY_WEIGHTS:
            g = torch.Generator().manual_seed(width)
            weights = torch.randint(1, 2**62, (width,), generator=g) * 2 + 1
            _KEY_WEIGHTS[key] = weights.to(flat.device)
        hashed = (flat.long() * _KEY_WEIGHTS[key]).sum(1).cpu()  # (n_valid,)
    keys = torch.iinfo(torch.int64).min + torch.arange(valid.numel()).view(valid.shape)
    keys[valid] = hashed
    return keys


def identical_groups(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Group identical patches, exactly (equal bytes).

    Args:
        patches: (n, ...).

    Returns:
        first: (u,) index of one member of each group; inverse: (n,) the group of each patch,
        so that ``patches[first][inverse]`` equals ``patches``. Both on the patches' device.
    """
    n = patches.shape[0]
    flat = patches.reshape(n, -1)
    if flat.device.type != "cpu":
        _, inverse = torch.unique(flat, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), n, device=flat.device)
        first.scatter_reduce_(0, inverse, torch.arange(n, device=flat.device), "amin")
        return first, inverse
    # a dict of row bytes: linear time, where sorting rows (torch.unique(dim=0)) is ~50x slower
    groups: dict[bytes, int] = {}
    inverse_list, first_list = [], []
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
    parts = [encode(patches[i : i + step]) for i in range(0, n, step)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def encode_distinct(encode: Encode, patches: Tensor, batch_size: int | None = None) -> Tensor:
    """Encode each distinct patch once and share its embedding with its copies: (n, D).

    Exact only where the encoder treats patches independently (eval mode): then identical
    patches (blank background, glass, padding) have identical embeddings.
    """
    first, inverse = identical_groups(patches)
    if len(first) == patches.shape[0]:
        return encode_batched(encode, patches, batch_size)
    emb = encode_batched(encode, patches[first], batch_size)  # (u, D)
    return emb[inverse.to(emb.device)]


def embed_valid(
    encode: Encode,
    patches: Tensor,
    valid: Tensor,
    *,
    batch_size: int | None = None,
    dedup: bool = False,
) -> Tensor:
    """Encode only the real patches and place them in a padded (B, k, D) tensor.

    Args:
        encode: maps (n, ...) patches to (n, D).
        patches: (n_valid, ...) the valid patches in (b, k) order.
        valid: (B, k) bool.
        batch_size: patches per encoder call; None encodes all at once.
        dedup: encode identical patches once (only exact in eval mode).

    Returns:
        (B, k, D), zeros where padded.
    """
    if dedup:
        emb = encode_distinct(encode, patches, batch_size)  # (n_valid, D)
    else:
        emb = encode_batched(encode, patches, batch_size)  # (n_valid, D)
    if bool(valid.all()):
        return emb.view(*valid.shape, emb.shape[-1])
    out = emb.new_zeros(*valid.shape, emb.shape[-1])
    out[valid.to(emb.device)] = emb
    return out


def select_patches(
    patches: Tensor | Sequence[Any],
    *,
    encode: Encode,
    score: Score,
    memory_size: int,
    chunk_size: int,
    mask: Tensor | None = None,
    device: torch.device | str | None = None,
    encoder_batch_size: int | None = None,
    dedup: bool = True,
    distinct: bool = False,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    observe: Observer | None = None,
) -> Selection:
    """Keep the M best-scoring patches of each image without gradients.

    Call it under ``torch.inference_mode()`` (or no_grad) with the modules in eval mode;
    ``IPSModel.select`` does both.

    Args:
        patches: a tensor (B, N, ...) on any device, or a sequence of B per-image containers.
        encode: maps (n, ...) patches on ``device`` to (n, D) embeddings.
        score: maps candidate embeddings (B, K, D), their original ids (B, K) and validity
            (B, K) to scores (B, K); higher is kept.
        memory_size: M.
        chunk_size: I.
        mask: (B, N), True for real patches of a padded tensor.
        device: where encoding happens; patches are moved there M or I at a time.
        encoder_batch_size: patches per encoder call.
        dedup: encode identical patches of a chunk once (exact: the encoder is in eval mode).
        distinct: keep at most one copy of identical patches in memory, so that a scorer that
            favours a repeated patch (blank background) cannot fill the memory with copies of
            it; the dropped copies come back with mask False.
        shuffle: visit the patches in one random order, so that ties (e.g. blank patches)
            do not always favour the first ones.
        generator: random generator for the order.
        observe: called as ``observe(ids, scores, valid)`` with every scored candidate set
            ((B, K) each, on the CPU), e.g. to collect a score map of all N patches for a
            heatmap at no extra encoder cost. A patch is scored again while it stays in
            memory; the last call for a patch holds its final score.

    Returns:
        Selection with ids, scores and mask of shape (B, min(M, N)), best first.
    """
    if memory_size <= 0:
        raise ValueError(f"memory_size (M) must be a positive integer, got {memory_size}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size (I) must be a positive integer, got {chunk_size}")
    store = PatchStore(patches, mask)
    if device is None:
        device = patches.device if isinstance(patches, Tensor) else torch.device("cpu")
    device = torch.device(device)
    B, N = store.batch_size, store.num_patches
    M, I = memory_size, chunk_size

    # one random visiting order, shared by the batch; original ids travel with the patches
    if shuffle:
        order = torch.randperm(N, generator=generator)  # (N,)
    else:
        order = torch.arange(N)
    order = order.unsqueeze(0).expand(B, -1)  # (B, N)

    def load(ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        valid = store.valid(ids)
        raw = store.read(ids, valid)
        return raw, valid, content_keys(raw, valid) if distinct else None

    def embed(raw: Tensor, valid: Tensor) -> Tensor:
        raw = to_device(raw, device)
        return embed_valid(encode, raw, valid, batch_size=encoder_batch_size, dedup=dedup)

    # the next chunk is read in a background thread while the current one is encoded, as long
    # as that keeps at most M + I raw patches resident (true whenever I <= M)
    lazy = not (isinstance(patches, Tensor) and patches.device == device)
    starts = list(range(min(M, N), N, I))
    with ThreadPoolExecutor(max_workers=1) if lazy else contextlib.nullcontext() as pool:

        def fetch(start: int) -> Any:
            ids = order[:, start : start + I]
            return pool.submit(load, ids) if pool is not None else load(ids)

        def result(pending: Any) -> tuple[Tensor, Tensor, Tensor | None]:
            return pending.result() if pool is not None else pending

        memory_ids = order[:, :M]  # (B, M)
        raw, memory_valid, memory_keys = load(memory_ids)
        pending = fetch(starts[0]) if starts else None
        memory = embed(raw, memory_valid)  # (B, M, D)
        del raw
        memory_scores = None
        for i, start in enumerate(starts):
            raw, chunk_valid, chunk_keys = result(pending)
            chunk_ids = order[:, start : start + I]  # (B, I)
            prefetch = pool is not None and i + 1 < len(starts) and I <= M
            pending = fetch(starts[i + 1]) if prefetch else None
            chunk = embed(raw, chunk_valid)  # (B, I, D)
            del raw
            if not prefetch and i + 1 < len(starts):
                pending = fetch(starts[i + 1])

            candidates = torch.cat([memory, chunk], dim=1)  # (B, M + I, D)
            candidate_ids = torch.cat([memory_ids, chunk_ids], dim=1)  # (B, M + I)
            candidate_valid = torch.cat([memory_valid, chunk_valid], dim=1)  # (B, M + I)
            on_device = candidate_valid.to(device)
            scores = score(candidates, candidate_ids.to(device), on_device)  # (B, M + I)
            scores = scores.float().masked_fill(~on_device, float("-inf"))
            if observe is not None:
                observe(candidate_ids, scores.cpu(), candidate_valid)
            if distinct:  # one copy of identical patches competes; the others drop out
                candidate_keys = torch.cat([memory_keys, chunk_keys], dim=1)  # (B, M + I)
                copies = duplicates(candidate_keys, candidate_valid).to(device)
                scores = scores.masked_fill(copies, float("-inf"))
            memory_scores, keep = scores.topk(M, dim=1)  # (B, M)
            memory = candidates.gather(1, keep[..., None].expand(-1, -1, candidates.shape[-1]))
            keep = keep.cpu()
            memory_ids = candidate_ids.gather(1, keep)
            memory_valid = candidate_valid.gather(1, keep) & memory_scores.isfinite().cpu()
            if distinct:
                memory_keys = candidate_keys.gather(1, keep)

    if memory_scores is None:  # N <= M: nothing to select, score the patches once for display
        on_device = memory_valid.to(device)
        memory_scores = score(memory, memory_ids.to(device), on_device).float()
        memory_scores = memory_scores.masked_fill(~on_device, float("-inf"))
        if observe is not None:
            observe(memory_ids, memory_scores.cpu(), memory_valid)
    # best first; padded entries last
    memory_scores, rank = memory_scores.sort(dim=1, descending=True)
    rank = rank.cpu()
    ids, valid = memory_ids.gather(1, rank), memory_valid.gather(1, rank)
    scores = memory_scores.masked_fill(~valid.to(memory_scores.device), 0.0).cpu()
    return Selection(ids.clone(), scores.clone(), valid.clone())


def gather_patches(
    patches: Tensor | Sequence[Any],
    selection: Selection,
    *,
    mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Read the selected raw patches again (for the gradient pass).

    Returns:
        (n_valid, ...) the valid selected patches in (b, k) order, on ``device``.
    """
    store = PatchStore(patches, mask)
    raw = store.read(selection.ids, selection.mask)
    return to_device(raw, torch.device(device) if device is not None else raw.device)
