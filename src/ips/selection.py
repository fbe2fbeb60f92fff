"""Iterative patch selection: keep the M best-scoring of N patches, streaming chunks of I.

Letters: B images, N patches per image, M memory size, I chunk size, D embedding width,
H heads, T query tokens.

Patches can live anywhere that can be indexed: a tensor (B, N, ...) on any device, or a
sequence of B per-image containers (tensors, numpy arrays, or lazy sources with ``read(ids)``)
of possibly different lengths. Only the first M patches and then one chunk of I at a time are
read and moved to the encoder's device, so memory depends on M and I, not on N.

Containers that read much faster in storage order than scattered (``sequential_reads``, e.g.
feature bags on disk, whose narrow rows cost a page fault each when read at random) are read
the other way round when the score is an `AttentionScore`: every patch is encoded once, in
blocks of I consecutive patches, and only its H x T logits, its id and validity (and its
content key) are kept: 4 H T + 9 (+ 8) bytes per patch, against 4 F for its features (41
against 8192 for CAMELYON16's H = 8, T = 1, F = 2048); the memory then visits the same
random order over those logits. The candidate sets, their scores and the selection are the
ones of the plain pass; only the reads are contiguous.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from ips.dedup import Encode, content_keys, duplicates, encode_batched, encode_distinct
from ips.errors import InputError

Score = Callable[[Tensor, Tensor, Tensor], Tensor]  # emb (B, K, D), ids, valid (B, K) -> (B, K)
Observer = Callable[[Tensor, Tensor, Tensor], None]  # ids, scores, valid (B, K)


@dataclasses.dataclass(frozen=True)
class AttentionScore:
    """A score that is a softmax over the candidates of logits each patch has on its own.

    Given one, ``select_patches`` computes a patch's logits once, when it is encoded, and
    scores every candidate set from the logits its members carry: the M patches in memory
    are not scored from their embeddings again at each of the N / I chunks. Called like a
    plain ``Score``, it gives the same scores.

    Args:
        logits: maps embeddings (B, k, D) and original ids (B, k) to logits (B, H, T, k).
        combine: maps the logits (B, H, T, K) of a candidate set and its validity (B, K) to
            scores (B, K).
    """

    logits: Callable[[Tensor, Tensor], Tensor]
    combine: Callable[[Tensor, Tensor], Tensor]

    def __call__(self, emb: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
        """(B, K) scores of the candidates emb (B, K, D) with ids and validity (B, K)."""
        return self.combine(self.logits(emb, ids), valid)


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
                raise InputError(
                    f"patches must be (B, N, ...) with per-patch dims, got {tuple(patches.shape)}"
                )
            self.batch_size, self.num_patches = patches.shape[:2]
            if mask is not None:
                if tuple(mask.shape) != (self.batch_size, self.num_patches):
                    raise InputError(
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
                raise InputError("mask is only for a padded tensor; a sequence carries lengths")
            if len(patches) == 0:
                raise InputError("patches: got an empty batch")
            self.batch_size = len(patches)
            self.lengths = torch.tensor([len(p) for p in patches])
            self.num_patches = int(self.lengths.max())
            self.mask = None
        if int(self.lengths.min()) == 0:
            raise InputError("every image needs at least one patch, got an image with none")

    def will_read(self, ids: Tensor) -> None:
        """Tell the containers that take hints (``will_read``) that ids (B, k) come next."""
        if isinstance(self.patches, Tensor):
            return
        valid = self.valid(ids)
        for b, container in enumerate(self.patches):
            wanted = ids[b][valid[b]]
            if len(wanted) and hasattr(container, "will_read"):
                container.will_read(wanted.numpy())

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


def embed_valid(
    encode: Encode,
    patches: Tensor,
    valid: Tensor,
    *,
    batch_size: int | None = None,
    dedup: bool = False,
    keys: Tensor | None = None,
) -> Tensor:
    """Encode only the real patches and place them in a padded (B, k, D) tensor.

    Args:
        encode: maps (n, ...) patches to (n, D).
        patches: (n_valid, ...) the valid patches in (b, k) order.
        valid: (B, k) bool.
        batch_size: patches per encoder call; None encodes all at once.
        dedup: encode identical patches once (only exact in eval mode).
        keys: (B, k) the patches' content keys, if known (they spare dedup its grouping
            where no patch repeats).

    Returns:
        (B, k, D), zeros where padded.
    """
    if dedup:
        known = None if keys is None else keys[valid.cpu()]
        emb = encode_distinct(encode, patches, batch_size, known)  # (n_valid, D)
    else:
        emb = encode_batched(encode, patches, batch_size)  # (n_valid, D)
    if bool(valid.all()):
        return emb.view(*valid.shape, emb.shape[-1])
    out = emb.new_zeros(*valid.shape, emb.shape[-1])
    out[valid.to(emb.device)] = emb
    return out


def micro_batch_logits(
    encode: Encode,
    score: AttentionScore,
    patches: Tensor,
    ids: Tensor,
    valid: Tensor,
    batch_size: int | None,
) -> Tensor:
    """The logits of one image's patches, each micro-batch's taken as soon as it is encoded
    (while its embeddings are in cache; the image's (k, D) embeddings are never assembled).

    The same logits as encoding every patch first (`embed_valid`) and taking the logits of
    the whole set: the micro-batches are the same, and a patch's logits do not depend on the
    patches beside it (`ips.aggregation.rows_times`).

    Args:
        encode: maps (n, ...) patches to (n, D).
        score: gives the logits (1, H, T, n) of embeddings (1, n, D) with ids (1, n).
        patches: (n_valid, ...) the valid patches in k order.
        ids: (1, k) their ids, on the encoder's device. valid: (1, k).
        batch_size: patches per encoder call; None encodes all at once.

    Returns:
        (1, H, T, k); 0 where padded.
    """
    where = valid[0].to(ids.device).nonzero().squeeze(1)  # (n_valid,) positions of real ones
    real = ids[0, where]
    n = patches.shape[0]
    step = max(1, n if batch_size is None else batch_size)
    parts = [
        score.logits(encode(patches[i : i + step]).unsqueeze(0), real[None, i : i + step])
        for i in range(0, n, step)
    ]
    logits = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (1, H, T, n_valid)
    if n == ids.shape[1]:
        return logits
    out = logits.new_zeros(*logits.shape[:-1], ids.shape[1])
    out[..., where] = logits
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
            (B, K) to scores (B, K); higher is kept. An ``AttentionScore`` is asked for each
            patch's logits once, when it is encoded.
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
        raise InputError(f"memory_size (M) must be a positive integer, got {memory_size}")
    if chunk_size <= 0:
        raise InputError(f"chunk_size (I) must be a positive integer, got {chunk_size}")
    store = PatchStore(patches, mask)
    if device is None:
        device = patches.device if isinstance(patches, Tensor) else torch.device("cpu")
    device = torch.device(device)
    M, I = memory_size, chunk_size

    def embed(raw: Tensor, ids: Tensor, valid: Tensor, keys: Tensor | None) -> Candidates:
        raw = to_device(raw, device)
        one_image = ids.shape[0] == 1 and raw.shape[0] > 0
        if isinstance(score, AttentionScore) and one_image and not dedup:
            logits = micro_batch_logits(
                encode, score, raw, ids.to(device), valid, encoder_batch_size
            )
            return Candidates(None, ids, valid, keys, logits)
        emb = embed_valid(encode, raw, valid, batch_size=encoder_batch_size, dedup=dedup, keys=keys)
        if not isinstance(score, AttentionScore):
            return Candidates(emb, ids, valid, keys)
        # keep only the logits: a patch's are the same in every candidate set it joins
        return Candidates(None, ids, valid, keys, score.logits(emb, ids.to(device)))

    def rank(candidates: Candidates, *, distinct: bool = distinct) -> Tensor:
        return score_candidates(score, candidates, device, observe=observe, distinct=distinct)

    order = visiting_order(store, shuffle=shuffle, generator=generator)  # (B, N)
    stream: ChunkStream | LogitVisits
    if isinstance(score, AttentionScore) and reads_sequentially(store):
        table = score_in_storage_order(store, I, embed=embed, keys=distinct, device=device)
        stream = LogitVisits(table, order, M, I)
    else:
        stream = ChunkStream(store, order, M, I, embed=embed, keys=distinct, device=device)
    with stream:
        memory, memory_scores = stream.memory(), None  # the first M patches, (B, M, ...)
        for chunk in stream:  # each next I patches, encoded: (B, I, ...)
            candidates = memory.cat(chunk)  # (B, M + I, ...)
            scores = rank(candidates)  # (B, M + I); -inf for padding and dropped copies
            memory_scores, keep = scores.topk(M, dim=1)  # (B, M)
            memory = candidates.take(keep, finite=memory_scores.isfinite())
    if memory_scores is None:  # N <= M: nothing to select, score the patches once for display
        memory_scores = rank(memory, distinct=False)
    return best_first(memory, memory_scores)


class Candidates(NamedTuple):
    """Patches competing for the memory: what they are scored from and what travels with them.

    emb: (B, K, D) on the encoder's device, for a plain score; None with an AttentionScore.
    ids: (B, K) original patch indices. valid: (B, K) True for real patches. keys: (B, K)
    content keys (``distinct``), else None. logits: (B, H, T, K) on the encoder's device,
    for an AttentionScore; else None.
    """

    emb: Tensor | None
    ids: Tensor
    valid: Tensor
    keys: Tensor | None
    logits: Tensor | None = None

    def cat(self, other: Candidates) -> Candidates:
        """This set and ``other`` side by side: (B, K + K', ...)."""
        return Candidates.concat([self, other])

    @staticmethod
    def concat(parts: Sequence[Candidates]) -> Candidates:
        """The sets of ``parts`` side by side, in one copy: (B, sum of their K, ...)."""
        if len(parts) == 1:
            return parts[0]

        def joined(field: str, dim: int) -> Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values, dim=dim)

        return Candidates(
            joined("emb", 1),
            torch.cat([p.ids for p in parts], dim=1),
            torch.cat([p.valid for p in parts], dim=1),
            joined("keys", 1),
            joined("logits", -1),
        )

    def pick(self, index: Tensor) -> Candidates:
        """The candidates at positions ``index`` (B, k), on any device: (B, k, ...)."""
        emb = logits = None
        if self.emb is not None:
            at = index.to(self.emb.device)[..., None].expand(-1, -1, self.emb.shape[-1])
            emb = self.emb.gather(1, at)
        if self.logits is not None:
            at = index.to(self.logits.device)[:, None, None, :]
            logits = self.logits.gather(-1, at.expand(*self.logits.shape[:-1], -1))  # (B,H,T,k)
        index = index.cpu()
        keys = None if self.keys is None else self.keys.gather(1, index)
        return Candidates(emb, self.ids.gather(1, index), self.valid.gather(1, index), keys, logits)

    def take(self, keep: Tensor, finite: Tensor) -> Candidates:
        """The candidates at ``keep`` (B, M); those whose score was not ``finite`` (padding,
        dropped copies) become invalid."""
        kept = self.pick(keep)
        return kept._replace(valid=kept.valid & finite.cpu())


def visiting_order(
    store: PatchStore, *, shuffle: bool, generator: torch.Generator | None
) -> Tensor:
    """(B, N) the order patches are visited in: one random permutation shared by the batch
    (so ties, e.g. blank patches, do not always favour the first ones), or raster order."""
    N = store.num_patches
    order = torch.randperm(N, generator=generator) if shuffle else torch.arange(N)
    return order.unsqueeze(0).expand(store.batch_size, -1)


def score_candidates(
    score: Score,
    candidates: Candidates,
    device: torch.device,
    *,
    observe: Observer | None = None,
    distinct: bool = False,
) -> Tensor:
    """(B, K) float scores of a candidate set: -inf for padding, reported to ``observe``;
    with ``distinct`` every copy of a patch after its first also gets -inf."""
    valid = candidates.valid.to(device)
    if isinstance(score, AttentionScore) and candidates.logits is not None:
        scores = score.combine(candidates.logits, valid)  # the logits each patch carries
    elif candidates.emb is not None:
        scores = score(candidates.emb, candidates.ids.to(device), valid)
    else:
        raise TypeError("candidates carry logits, which only an AttentionScore can combine")
    scores = scores.float()
    scores = scores.masked_fill(~valid, float("-inf"))
    if observe is not None:
        observe(candidates.ids, scores.cpu(), candidates.valid)
    if distinct and candidates.keys is not None:  # one copy of identical patches competes
        copies = duplicates(candidates.keys, candidates.valid).to(device)
        scores = scores.masked_fill(copies, float("-inf"))
    return scores


def best_first(memory: Candidates, scores: Tensor) -> Selection:
    """The memory sorted by score, padded entries last, with score 0."""
    scores, rank = scores.sort(dim=1, descending=True)
    rank = rank.cpu()
    ids, valid = memory.ids.gather(1, rank), memory.valid.gather(1, rank)
    return Selection(ids, scores.masked_fill(~valid.to(scores.device), 0.0).cpu(), valid)


def chunk_starts(num_patches: int, memory_size: int, chunk_size: int) -> list[int]:
    """Where each chunk of I starts in a visiting order of N patches whose first M fill the
    memory."""
    return list(range(min(memory_size, num_patches), num_patches, chunk_size))


class ChunkStream:
    """The patches of one visiting order, read and encoded: the first M, then chunks of I.

    For lazy containers the next chunk is read in a background thread while the current one
    is encoded, as long as that keeps at most M + I raw patches resident (whenever I <= M);
    otherwise it is read once the current chunk is encoded. Without ``background`` every
    chunk is read in the calling thread, and containers that take hints (``will_read``) are
    told of the next one, so that the operating system can fetch it from disk meanwhile.

    Args:
        store: the batch's patches.
        order: (B, N) the visiting order.
        memory_size, chunk_size: M and I.
        embed: ``embed(raw, ids, valid, keys) -> Candidates``: encodes the raw patches
            (n_valid, ...) of ids and validity (B, k).
        keys: also compute content keys (for ``distinct``).
        device: where encoding happens (patches already there are not prefetched).
        background: read the next chunk in a background thread.
    """

    def __init__(
        self,
        store: PatchStore,
        order: Tensor,
        memory_size: int,
        chunk_size: int,
        *,
        embed: Callable[[Tensor, Tensor, Tensor, Tensor | None], Candidates],
        keys: bool,
        device: torch.device,
        background: bool = True,
    ):
        self.store, self.order, self.embed, self.keys = store, order, embed, keys
        self.M, self.I = memory_size, chunk_size
        N = store.num_patches
        self.starts = chunk_starts(N, self.M, self.I)
        patches = store.patches
        self.lazy = not (isinstance(patches, Tensor) and patches.device == device)
        self.background = background
        self.pool: ThreadPoolExecutor | None = None
        # one image read block after block in this thread from a bag that reads consecutive
        # rows into a given array: every block goes into the first one's buffer (each block
        # is encoded, and no longer referenced, before the next is read)
        self.reuse = not background and store.batch_size == 1 and reads_sequentially(store)
        self._buffer: np.ndarray | None = None

    def __enter__(self) -> ChunkStream:
        if self.lazy and self.background:
            self.pool = ThreadPoolExecutor(max_workers=1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def memory(self) -> Candidates:
        """The first M patches, encoded; the first chunk starts being read meanwhile."""
        ids = self.order[:, : self.M]  # (B, M)
        raw, valid, keys = self._load(ids)
        self._pending = self._fetch(0) if self.starts else None
        return self.embed(raw, ids, valid, keys)

    def __iter__(self) -> Iterator[Candidates]:
        early = self.pool is not None and self.I <= self.M  # M + I raw patches at most
        for i in range(len(self.starts)):
            raw, valid, keys = self._result(i)
            more = i + 1 < len(self.starts)
            self._pending = self._fetch(i + 1) if early and more else None
            chunk = self.embed(raw, self._chunk_ids(i), valid, keys)  # (B, I, ...)
            del raw
            if more and not early:
                self._pending = self._fetch(i + 1)
            yield chunk

    def _chunk_ids(self, i: int) -> Tensor:
        start = self.starts[i]
        return self.order[:, start : start + self.I]  # (B, I)

    def _load(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        valid = self.store.valid(ids)
        wanted = ids[0][valid[0]] if self.reuse else None
        if wanted is not None and len(wanted):
            bag: Any = self.store.patches[0]
            rows = bag.read(wanted.numpy(), out=self._buffer)
            if self._buffer is None and rows.flags.c_contiguous and rows.flags.writeable:
                self._buffer = rows
            raw = torch.from_numpy(rows)
        else:
            raw = self.store.read(ids, valid)
        return raw, valid, content_keys(raw, valid) if self.keys else None

    def _fetch(self, i: int) -> Any:
        """Start reading chunk i: in the background thread, else as a hint to the containers
        (it is read when it is needed)."""
        ids = self._chunk_ids(i)
        if self.pool is not None:
            return self.pool.submit(self._load, ids)
        if self.lazy:
            self.store.will_read(ids)
        return None

    def _result(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Chunk i, read."""
        if self._pending is not None:
            return self._pending.result()
        return self._load(self._chunk_ids(i))


def reads_sequentially(store: PatchStore) -> bool:
    """Whether every container of the batch reads much faster in storage order than scattered
    (says ``sequential_reads``; feature bags do). Such containers also take
    ``read(ids, out=array)``, which may read consecutive rows into ``array``."""
    patches = store.patches
    if isinstance(patches, Tensor):
        return False
    return all(getattr(p, "sequential_reads", False) for p in patches)


def score_in_storage_order(
    store: PatchStore,
    block: int,
    *,
    embed: Callable[[Tensor, Tensor, Tensor, Tensor | None], Candidates],
    keys: bool,
    device: torch.device,
) -> Candidates:
    """Every patch read and encoded once, in blocks of ``block`` consecutive patches (each
    read in this thread, the next one announced to the containers that take hints while one is
    encoded), down to what ``embed`` keeps.

    Returns:
        Candidates (B, N): position n holds patch n (ids 0..N-1; valid False past an image's
        length).
    """
    B, N = store.batch_size, store.num_patches
    rows = torch.arange(N).unsqueeze(0).expand(B, -1)  # (B, N) storage order
    # read in this thread: a read of cached pages is a copy that, in a second thread, takes
    # a core from the encoder (selection 7 % slower on 2 cores, benchmarks/features_speed.md);
    # the operating system reads the next block ahead from disk instead
    stream = ChunkStream(
        store, rows, block, block, embed=embed, keys=keys, device=device, background=False
    )
    with stream:
        return Candidates.concat([stream.memory(), *stream])


class LogitVisits:
    """The visits of `ChunkStream` (the first M patches, then chunks of I, in ``order``),
    taken from patches already encoded: a table whose position n holds patch n.

    Args:
        table: Candidates (B, N) from `score_in_storage_order`.
        order: (B, N) the visiting order.
        memory_size, chunk_size: M and I.
    """

    def __init__(self, table: Candidates, order: Tensor, memory_size: int, chunk_size: int):
        self.table, self.order = table, order
        self.M, self.I = memory_size, chunk_size

    def __enter__(self) -> LogitVisits:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def memory(self) -> Candidates:
        """The first M patches of the order."""
        return self.table.pick(self.order[:, : self.M])

    def __iter__(self) -> Iterator[Candidates]:
        for start in chunk_starts(self.order.shape[1], self.M, self.I):
            yield self.table.pick(self.order[:, start : start + self.I])


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
