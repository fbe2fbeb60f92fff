"""Selection from logits computed once per patch equals re-scoring every candidate set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

import ips
from conftest import random_patches
from ips.aggregation import CrossAttentionPool, selection_scores
from ips.dedup import content_keys, duplicates
from ips.selection import AttentionScore, embed_valid, eval_mode, select_patches

M, I, GRID = 7, 5, (5, 9)  # N = 45: the N - M = 38 patches after the memory end in a short chunk
TASKS = {  # three tasks: T = 3 queries
    "digit": {"kind": "multiclass", "num_classes": 3},
    "tumour": {"kind": "binary"},
    "labels": {"kind": "multilabel", "num_classes": 4},
}


def _model(kind: str, fold: bool = True, **kw) -> ips.IPSModel:
    torch.manual_seed(0)
    if kind == "features":
        arch = dict(encoder="features", feature_dim=16, embed_dim=32, num_heads=4, head_dim=8)
    else:  # small pixel patches through the default convolutional trunk
        arch = dict(in_channels=1, patch_size=8, embed_dim=16, num_heads=2, head_dim=8)
    settings = dict(mlp_dim=16, dropout=0.0, tasks=TASKS, memory_size=M, chunk_size=I)
    # queries of unit scale, so that scores differ clearly between patches
    model = ips.create_model(**arch, **settings, query_std=1.0, **kw)
    model.pool.attn.fold_queries = fold  # False: every patch's keys computed
    return model


def _patches(kind: str, n: int) -> Tensor:
    """(3, n, ...) patches where every third one is a copy of the first."""
    if kind == "features":
        x = torch.randn(3, n, 16, generator=torch.Generator().manual_seed(n))
    else:
        x = random_patches(3, n, seed=n)
    x[:, ::3] = x[:, :1]
    return x


def _rescoring_reference(model, patches, mask, order, grid_shape):
    """Selection as it was specified first: every chunk re-scores the whole candidate set
    (memory + chunk) from embeddings with ``model.pool.scores``.

    Returns:
        ids, scores, mask (B, K) best first, and the observed (ids, scores, valid) sets.
    """
    sel = model.selection_config
    B, N = patches.shape[:2]
    real = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    batch = model._encoder_batch_size(torch.device("cpu"))
    observed = []

    def encode(ids):  # (B, k) -> emb (B, k, D), ids, valid, keys (B, k)
        valid = real.gather(1, ids)
        raw = patches[torch.arange(B)[:, None].expand_as(ids)[valid], ids[valid]]
        emb = embed_valid(model.embed, raw, valid, batch_size=batch, dedup=sel.dedup)
        return [emb, ids, valid, content_keys(raw, valid)]

    def score(emb, ids, valid, keys, distinct):
        pos = model.positional(ids, model._positions(ids, grid_shape, patches))
        s = model.pool.scores(emb if pos is None else emb.float() + pos, valid).float()
        s = s.masked_fill(~valid, float("-inf"))
        observed.append((ids, s, valid))
        return s.masked_fill(duplicates(keys, valid), float("-inf")) if distinct else s

    with torch.inference_mode(), eval_mode(model):
        memory, memory_scores = encode(order[:, : sel.memory_size]), None
        for start in range(min(sel.memory_size, N), N, sel.chunk_size):
            chunk = encode(order[:, start : start + sel.chunk_size])
            candidates = [torch.cat(pair, dim=1) for pair in zip(memory, chunk, strict=True)]
            memory_scores, keep = score(*candidates, sel.distinct).topk(sel.memory_size, dim=1)
            emb, ids, valid, keys = candidates
            memory = [
                emb.gather(1, keep[..., None].expand(-1, -1, emb.shape[-1])),
                ids.gather(1, keep),
                valid.gather(1, keep) & memory_scores.isfinite(),
                keys.gather(1, keep),
            ]
        if memory_scores is None:
            memory_scores = score(*memory, False)
        scores, rank = memory_scores.sort(dim=1, descending=True)
        ids, valid = memory[1].gather(1, rank), memory[2].gather(1, rank)
    return ids, scores.masked_fill(~valid, 0.0), valid, observed


def _assert_same_selection(got, ids, scores, valid):
    assert torch.equal(got.ids, ids)
    assert torch.equal(got.mask, valid)
    _assert_close(got.scores, scores)


def _assert_close(a, b):
    # float32 rounding apart: on some CPUs a row of a matmul comes out in other bits when
    # other rows share the call (logits of one chunk against those of the whole set)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _assert_same_observed(a, b):
    assert len(a) == len(b)
    for (ids_a, scores_a, valid_a), (ids_b, scores_b, valid_b) in zip(a, b, strict=True):
        assert torch.equal(ids_a, ids_b) and torch.equal(valid_a, valid_b)
        _assert_close(scores_a, scores_b)


FEATURE_CASES = [
    ("features", pos_enc, distinct, padding)
    for pos_enc in ("none", "1d", "2d")
    for distinct in (False, True)
    for padding in ("none", "mask", "list")
]
PIXEL_CASES = [  # the scoring side is covered above; a convolutional trunk costs seconds
    ("pixels", "2d", True, "mask"),
    ("pixels", "1d", False, "list"),
    ("pixels", "none", True, "none"),
]


@pytest.mark.parametrize(("kind", "pos_enc", "distinct", "padding"), FEATURE_CASES + PIXEL_CASES)
def test_cached_logits_select_exactly_what_rescoring_every_chunk_selects(
    kind, pos_enc, distinct, padding
):
    model = _model(kind, pos_enc=pos_enc, distinct=distinct)
    patches, mask = _patches(kind, 45), None
    if padding != "none":  # bags of 45, 29 and 3 (< M) patches
        mask = torch.arange(45) < torch.tensor([45, 29, 3])[:, None]
    bags = [p[m] for p, m in zip(patches, mask, strict=True)] if padding == "list" else None
    seen: list = []
    got = model.select(
        bags if bags is not None else patches,
        None if bags is not None else mask,
        grid_shape=GRID,
        generator=torch.Generator().manual_seed(4),
        observe=lambda *record: seen.append(record),
    )
    order = torch.randperm(45, generator=torch.Generator().manual_seed(4)).expand(3, -1)
    ids, scores, valid, observed = _rescoring_reference(model, patches, mask, order, GRID)
    _assert_same_selection(got, ids, scores, valid)
    _assert_same_observed(seen, observed)
    if distinct:  # the copies were in play: at most one of them is kept per image
        copy = got.ids % 3 == 0
        assert bool(((copy & got.mask).sum(1) <= 1).all())


@pytest.mark.parametrize("n", [3, 7, 45])  # N < M, N = M (no chunk) and several chunks
@pytest.mark.parametrize("kind", ["features", "pixels"])
def test_cached_logits_select_exactly_what_rescoring_selects_without_a_full_chunk(kind, n):
    model = _model(kind, pos_enc="1d", distinct=True)
    patches = _patches(kind, n)
    got = model.select(patches, generator=torch.Generator().manual_seed(2))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2)).expand(3, -1)
    ids, scores, valid, _ = _rescoring_reference(model, patches, None, order, None)
    _assert_same_selection(got, ids, scores, valid)


def test_cached_logits_select_exactly_what_rescoring_selects_under_bf16_autocast():
    # the encoder runs in bf16; logits and their softmax stay in float32 on both paths
    model = _model("features", pos_enc="1d", distinct=False)
    patches = _patches("features", 45)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.select(patches, generator=torch.Generator().manual_seed(5))
        order = torch.randperm(45, generator=torch.Generator().manual_seed(5)).expand(3, -1)
        ids, scores, valid, _ = _rescoring_reference(model, patches, None, order, None)
    _assert_same_selection(got, ids, scores, valid)


@pytest.mark.parametrize("pos_enc", ["none", "2d"])
@pytest.mark.parametrize("distinct", [False, True])
def test_folded_queries_select_what_every_patchs_keys_select(distinct, pos_enc):
    # (W_k^T q) . x against q . (W_k x): equal in exact arithmetic, so the same patches are
    # kept and the scores agree to float32 rounding. Copies tie exactly, and rounding may
    # break such ties either way: they compete only with distinct memory
    patches = _patches("features", 45)
    if not distinct:
        patches = torch.randn(3, 45, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(45) < torch.tensor([45, 29, 3])[:, None]
    got = []
    for fold in (False, True):
        model = _model("features", fold=fold, pos_enc=pos_enc, distinct=distinct)
        got.append(
            model.select(patches, mask, grid_shape=GRID, generator=torch.Generator().manual_seed(4))
        )
    plain, folded = got
    _assert_same_selection(folded, plain.ids, plain.scores, plain.mask)
    with torch.no_grad():  # the pooling's attention too
        x = torch.randn(3, 45, 32)
        model.pool.attn.fold_queries = False
        weights = model.pool(x)[1]
        model.pool.attn.fold_queries = True
        _assert_close(model.pool(x)[1], weights)


def _pool_score(pool: CrossAttentionPool, calls: list[int]) -> AttentionScore:
    def logits(emb: Tensor, ids: Tensor) -> Tensor:
        calls.append(emb.shape[1])
        return pool.logits(emb)

    return AttentionScore(logits, combine=selection_scores)


def test_every_patch_gets_its_logits_once_and_a_plain_call_gives_the_same_selection():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 32)
    pool = CrossAttentionPool(embed_dim=32, num_heads=4, head_dim=8, mlp_dim=16, num_queries=3)
    features = torch.randn(2, 53, 16)
    cached_calls: list[int] = []
    plain_calls: list[int] = []
    cached = _pool_score(pool, cached_calls)
    plain = _pool_score(pool, plain_calls)
    results, seen = [], []
    for score in (cached, lambda emb, ids, valid: plain(emb, ids, valid)):
        records: list = []
        with torch.no_grad():
            results.append(
                select_patches(
                    features,
                    encode=encoder,
                    score=score,
                    memory_size=6,
                    chunk_size=4,
                    generator=torch.Generator().manual_seed(3),
                    observe=lambda *record, records=records: records.append(record),
                )
            )
        seen.append(records)
    assert sum(cached_calls) == 53  # the first M, then each chunk: every patch once
    assert sum(plain_calls) == 11 * (6 + 4) + (6 + 3)  # the memory again at each chunk
    _assert_same_selection(results[0], *results[1])
    _assert_same_observed(*seen)


# ---- feature bags: every row encoded once in storage order, the random order visited over
# their logits ---------------------------------------------------------------------------------

LENGTHS = (45, 29, 3)  # several chunks, a short last one, and fewer patches than M


def _write_bags(folder, patches: Tensor, kind: str) -> list:
    """Bags of LENGTHS rows of ``patches`` (3, 45, F), their coords on the raster of GRID."""
    from ips.data.feature_bags import FeatureBag, open_feature_bag

    h5py = pytest.importorskip("h5py")
    cols = GRID[1]
    bags = []
    for b, n in enumerate(LENGTHS):
        rows = patches[b, :n].numpy()
        ids = np.arange(n)
        coords = (np.stack([ids % cols, ids // cols], 1) * 16).astype(np.int64)
        path = folder / f"bag_{b}.{kind}"
        if kind == "h5":
            with h5py.File(path, "w") as f:
                f["features"], f["coords"] = rows, coords
            bags.append(open_feature_bag(path))
        elif kind == "npy":
            np.save(path, rows)
            bags.append(open_feature_bag(path))
        else:
            bags.append(FeatureBag(rows, coords, name=f"bag_{b}"))
    return bags


BAG_CASES = [
    ("h5", "2d", True),
    ("h5", "1d", False),
    ("npy", "none", True),
    ("npy", "1d", False),
    ("memory", "2d", False),
    ("memory", "none", True),
]


@pytest.mark.parametrize(("kind", "pos_enc", "distinct"), BAG_CASES)
def test_bags_read_in_storage_order_select_exactly_what_rescoring_every_chunk_selects(
    tmp_path, kind, pos_enc, distinct
):
    model = _model("features", pos_enc=pos_enc, distinct=distinct)
    patches = _patches("features", 45)
    mask = torch.arange(45) < torch.tensor(LENGTHS)[:, None]
    bags = _write_bags(tmp_path, patches, kind)
    assert all(bag.sequential_reads for bag in bags)
    seen: list = []
    got = model.select(
        bags, generator=torch.Generator().manual_seed(4), observe=lambda *r: seen.append(r)
    )
    order = torch.randperm(45, generator=torch.Generator().manual_seed(4)).expand(3, -1)
    ids, scores, valid, observed = _rescoring_reference(model, patches, mask, order, GRID)
    _assert_same_selection(got, ids, scores, valid)
    _assert_same_observed(seen, observed)  # the same candidate sets, in the same order


def test_selection_reads_a_bag_once_in_consecutive_blocks_of_the_chunk_size():
    from ips.data.feature_bags import FeatureBag

    class Recording(FeatureBag):
        def _rows(self, ids):
            reads.append(ids)
            return super()._rows(ids)

        def will_read(self, ids):
            hints.append((int(ids[0]), int(ids[-1]) + 1, len(ids)))

    reads: list = []
    hints: list = []
    features = torch.randn(45, 16, generator=torch.Generator().manual_seed(1)).numpy()
    model = _model("features", pos_enc="1d", distinct=True)
    got = model.select([Recording(features)], generator=torch.Generator().manual_seed(4))
    assert all(isinstance(r, slice) for r in reads)  # contiguous reads, no scattered rows
    blocks = [(s, min(s + I, 45)) for s in range(0, 45, I)]
    assert [(r.start, r.stop) for r in reads] == blocks
    # each block after the first announced (one run of rows) while the one before is encoded
    assert hints == [(a, b, b - a) for a, b in blocks[1:]]
    # the same selection as a tensor of the same rows, visited chunk by chunk in random order
    plain = model.select(
        torch.from_numpy(features)[None], generator=torch.Generator().manual_seed(4)
    )
    _assert_same_selection(got, plain.ids, plain.scores, plain.mask)


@pytest.mark.parametrize(
    ("pos_enc", "padding", "distinct"),
    [("1d", "mask", False), ("2d", "mask", True), ("2d", "bags", False), ("none", "none", True)],
)
def test_one_image_at_a_time_scores_each_micro_batch_and_selects_what_rescoring_selects(
    tmp_path, pos_enc, padding, distinct
):
    # one image per selection: each encoder call's logits are taken at once, never the
    # embeddings of a whole chunk; bags are read in storage order, tensors in visiting order
    model = _model(
        "features",
        pos_enc=pos_enc,
        distinct=distinct,
        dedup=False,
        encoder_batch_size=2,
        loading="eager_sequential",
    )
    patches = torch.randn(3, 45, 16, generator=torch.Generator().manual_seed(6))
    mask = None if padding == "none" else torch.arange(45) < torch.tensor(LENGTHS)[:, None]
    inputs = _write_bags(tmp_path, patches, "h5") if padding == "bags" else patches
    sizes: list[int] = []
    pool_logits = model.pool.logits
    model.pool.logits = lambda x, *rest: (sizes.append(x.shape[1]), pool_logits(x, *rest))[1]
    got = model.select(
        inputs,
        mask if padding == "mask" else None,
        grid_shape=GRID,
        generator=torch.Generator().manual_seed(4),
    )
    # each real patch's logits came from its encoder call of 2 (calls over a chunk with no
    # real patch aside)
    real = sum(LENGTHS) if padding != "none" else 3 * 45
    assert sum(s for s in sizes if s <= 2) == real
    del model.pool.logits
    g = torch.Generator().manual_seed(4)  # each image draws its own order, one after another
    for b in range(3):
        n = LENGTHS[b] if padding == "bags" else 45
        order = torch.randperm(n, generator=g)[None]
        image = patches[b : b + 1, :n]
        image_mask = None if mask is None or padding == "bags" else mask[b : b + 1]
        ids, scores, valid, _ = _rescoring_reference(model, image, image_mask, order, GRID)
        k = ids.shape[1]
        assert torch.equal(got.ids[b, :k], ids[0]) and torch.equal(got.mask[b, :k], valid[0])
        _assert_close(got.scores[b, :k], scores[0])
        assert not got.mask[b, k:].any()


def test_the_queries_are_folded_once_per_selection_not_once_per_chunk():
    model = _model("features", pos_enc="none", distinct=False)
    calls: list[int] = []
    model.pool.attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    patches = _patches("features", 45)
    got = model.select(patches, generator=torch.Generator().manual_seed(4))
    assert len(calls) == 1  # the memory and 8 chunks scored, the queries projected once
    order = torch.randperm(45, generator=torch.Generator().manual_seed(4)).expand(3, -1)
    ids, scores, valid, _ = _rescoring_reference(model, patches, None, order, None)
    _assert_same_selection(got, ids, scores, valid)


def test_one_bag_read_block_after_block_reuses_one_buffer_and_selects_the_same(tmp_path):
    from ips.data.feature_bags import H5FeatureBag

    model = _model("features", pos_enc="2d", distinct=False, loading="eager_sequential")
    patches = _patches("features", 45)
    bag = _write_bags(tmp_path, patches, "h5")[0]  # 45 rows
    assert isinstance(bag, H5FeatureBag)
    buffers: list = []
    read = bag.read

    def recording(ids, out=None):
        rows = read(ids, out=out)
        buffers.append((out, rows))
        return rows

    bag.read = recording
    got = model.select([bag], generator=torch.Generator().manual_seed(4))
    first = buffers[0][1]
    assert buffers[0][0] is None and len(buffers) == 9  # the memory's block, then 8 more
    for out, rows in buffers[1:]:  # every later block read into the first block's array
        assert out is first and np.shares_memory(rows, first)
    plain = model.select(patches[:1], grid_shape=GRID, generator=torch.Generator().manual_seed(4))
    _assert_same_selection(got, plain.ids, plain.scores, plain.mask)
