from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import ips
from conftest import random_patches
from ips.aggregation import CrossAttentionPool
from ips.dedup import content_keys, identical_groups
from ips.selection import eval_mode, select_patches

F_DIM, D = 6, 8


def _parts(num_heads: int, num_queries: int, seed: int = 0):
    torch.manual_seed(seed)
    encoder = nn.Linear(F_DIM, D)
    pool = CrossAttentionPool(
        embed_dim=D, num_heads=num_heads, head_dim=4, mlp_dim=16, num_queries=num_queries
    )
    return encoder, pool


def _select(features, encoder, pool, m, i, **kw):
    with torch.no_grad():
        return select_patches(
            features,
            encode=encoder,
            score=lambda emb, ids, valid: pool.scores(emb, valid),
            memory_size=m,
            chunk_size=i,
            **kw,
        )


@pytest.mark.parametrize("seed", range(25))
def test_select_patches_equals_global_topk_with_one_head_and_one_query(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    m = int(rng.integers(1, 25))
    i = int(rng.integers(1, 20))
    encoder, pool = _parts(num_heads=1, num_queries=1, seed=seed)
    features = torch.randn(3, n, F_DIM, generator=torch.Generator().manual_seed(seed))
    sel = _select(features, encoder, pool, m, i, generator=torch.Generator().manual_seed(seed))

    with torch.no_grad():  # one-shot global top-M over all N attention logits
        q = pool.attn.q_proj(pool.queries)  # (1, D_k)
        k = pool.attn.k_proj(encoder(features))  # (B, N, D_k)
        logits = (k @ q.T).squeeze(-1)  # (B, N)
    expected = logits.topk(min(m, n), dim=1).indices
    assert sel.ids.shape == (3, min(m, n))
    for b in range(3):
        assert set(sel.ids[b].tolist()) == set(expected[b].tolist())
    assert bool(sel.mask.all())


def _reference_loop(features, encoder, pool, m, i, order):
    """The IPS loop restated plainly: per image, per head and per query, with Python lists."""
    t, h = pool.queries.shape[0], pool.attn.num_heads
    dk = pool.attn.head_dim

    def scores_of(emb):  # emb (K, D) -> (K,)
        q = pool.attn.q_proj(pool.queries)  # (T, H * D_k)
        key = pool.attn.k_proj(emb)  # (K, H * D_k)
        total = torch.zeros(emb.shape[0])
        for head in range(h):
            for query in range(t):
                qh = q[query, head * dk : (head + 1) * dk]
                kh = key[:, head * dk : (head + 1) * dk]
                total += torch.softmax(kh @ qh / math.sqrt(dk), dim=0)
        return total / (h * t)

    selected = []
    with torch.no_grad():
        for image in features:
            memory = [int(j) for j in order[:m]]
            for start in range(m, len(order), i):
                candidates = memory + [int(j) for j in order[start : start + i]]
                s = scores_of(encoder(image[candidates]))
                best = sorted(range(len(candidates)), key=lambda c: -float(s[c]))[:m]
                memory = [candidates[c] for c in best]
            selected.append(sorted(memory))
    return selected


@pytest.mark.parametrize(
    ("heads", "queries", "n", "m", "i"),
    [(4, 1, 40, 7, 5), (1, 3, 37, 6, 9), (2, 2, 50, 10, 3), (3, 4, 23, 5, 23), (2, 3, 9, 12, 4)],
)
def test_select_patches_equals_a_plain_restatement_with_many_heads_or_queries(
    heads, queries, n, m, i
):
    encoder, pool = _parts(num_heads=heads, num_queries=queries, seed=n)
    features = torch.randn(2, n, F_DIM, generator=torch.Generator().manual_seed(n))
    sel = _select(features, encoder, pool, m, i, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    expected = _reference_loop(features, encoder, pool, m, i, order)
    assert [sorted(row) for row in sel.ids.tolist()] == expected


def test_select_patches_returns_best_first_with_scores():
    encoder, pool = _parts(num_heads=2, num_queries=2)
    sel = _select(torch.randn(2, 30, F_DIM), encoder, pool, 5, 4)
    assert torch.all(sel.scores[:, :-1] >= sel.scores[:, 1:])
    assert torch.all(sel.scores > 0)


def test_select_patches_rejects_nonpositive_memory_or_chunk():
    encoder, pool = _parts(1, 1)
    with pytest.raises(ValueError, match="memory_size"):
        _select(torch.randn(1, 5, F_DIM), encoder, pool, 0, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        _select(torch.randn(1, 5, F_DIM), encoder, pool, 2, -1)


def test_selection_never_picks_padded_patches():
    encoder, pool = _parts(2, 2)
    features = torch.randn(2, 40, F_DIM)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 12:] = False
    features[1, 12:] = 100.0  # padding that would dominate attention if it leaked in
    sel = _select(features, encoder, pool, 8, 5, mask=mask)
    assert int(sel.ids[1].max()) < 12
    assert bool(sel.mask.all())
    # fewer real patches than M: the extra slots are marked padded
    sel = _select(features, encoder, pool, 20, 5, mask=mask)
    assert sel.mask[1].sum() == 12 and bool(sel.mask[0].all())
    assert set(sel.ids[1][sel.mask[1]].tolist()) == set(range(12))


def _model(tiny, **kw):
    torch.manual_seed(0)
    return ips.create_model(**{**tiny, "memory_size": 6, "chunk_size": 4, **kw})


def test_selection_leaves_batchnorm_statistics_and_modes_unchanged(tiny):
    model = _model(tiny)
    model.train()
    model.heads.eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.select(random_patches(2, 30))
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.equal(v, stats[k]), k


def test_selection_restores_modes_when_the_encoder_raises_mid_loop(tiny):
    model = _model(tiny)
    model.train()
    calls = {"n": 0}
    original = model.encoder.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk went away")
        return original(x)

    model.encoder.forward = flaky
    with pytest.raises(RuntimeError, match="disk went away"):
        model.select(random_patches(1, 40))
    assert all(m.training for m in model.modules())


def test_eval_mode_restores_each_module():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    net[1].eval()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training


class _Instrumented:
    """A lazy per-image container that counts the raw patches alive at any moment."""

    def __init__(self, n: int, stats: dict):
        self.n, self.stats = n, stats

    def __len__(self) -> int:
        return self.n

    def read(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        assert ids.min() >= 0 and ids.max() < self.n
        out = np.sin(ids[:, None] * np.arange(1.0, 5.0)).astype(np.float32)  # (n, F) distinct
        self.stats["alive"] += len(ids)
        self.stats["max_alive"] = max(self.stats["max_alive"], self.stats["alive"])
        self.stats["max_read"] = max(self.stats["max_read"], len(ids))
        weakref.finalize(out, self._release, len(ids))
        return out

    def _release(self, k: int) -> None:
        self.stats["alive"] -= k


@pytest.mark.parametrize(("m", "i"), [(6, 4), (4, 6), (5, 5)])
@pytest.mark.parametrize("n", [12, 60, 3000])
def test_no_more_than_m_plus_i_patches_are_ever_read_at_once(tiny, m, i, n):
    features = dict(encoder="features", feature_dim=4)
    model = _model(tiny, memory_size=m, chunk_size=i, loading="lazy", **features)
    stats = {"alive": 0, "max_alive": 0, "max_read": 0}
    model.select([_Instrumented(n, stats)])
    assert stats["max_read"] <= max(m, i)
    assert stats["max_alive"] <= m + i
    assert stats["alive"] == 0


def test_eager_lazy_and_sequential_selections_are_identical(tiny):
    patches = random_patches(3, 21)
    results = []
    for loading in ("eager", "lazy", "eager_sequential"):
        model = _model(tiny, loading=loading)
        for container in (patches, [p.numpy() for p in patches]):
            g = torch.Generator().manual_seed(3)
            if loading == "eager_sequential":  # one order per image, drawn in turn
                results.append(("seq", model.select(container, generator=g).ids))
            else:
                results.append(("batch", model.select(container, generator=g).ids))
    batch = [ids for kind, ids in results if kind == "batch"]
    seq = [ids for kind, ids in results if kind == "seq"]
    assert all(torch.equal(batch[0], ids) for ids in batch)
    assert all(torch.equal(seq[0], ids) for ids in seq)
    # sequential selection of image 0 uses the same first order as the batch
    assert torch.equal(seq[0][0], batch[0][0])


def test_same_seed_gives_the_same_selection(tiny):
    model = _model(tiny)
    patches = random_patches(2, 40)
    a = model.select(patches, generator=torch.Generator().manual_seed(5))
    b = model.select(patches, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.scores, b.scores)


def test_identical_patches_do_not_always_favour_the_first_ones(tiny):
    model = _model(tiny, memory_size=3, chunk_size=3)
    blank = torch.zeros(1, 12, 1, 8, 8, dtype=torch.uint8)
    picks = set()
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        picks |= set(model.select(blank, generator=g).ids[0].tolist())
    assert len(picks) > 3


def _blank_heavy(b: int = 2, n: int = 40, seed: int = 0) -> torch.Tensor:
    patches = random_patches(b, n, seed=seed)
    patches[:, ::3] = 0  # a third of the patches are identical blank background
    return patches


def test_encoding_each_distinct_patch_once_gives_the_same_selection(tiny):
    patches = _blank_heavy()
    results = []
    for dedup in (False, True):
        model = _model(tiny, dedup=dedup)
        results.append(model.select(patches, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(results[0].ids, results[1].ids)
    assert torch.allclose(results[0].scores, results[1].scores, atol=1e-6)


@pytest.mark.parametrize("collide", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_identical_groups_are_exact_and_keep_the_first_copy(dtype, collide):
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 4, (7, 1, 2, 2), generator=g).to(dtype)  # few values: many repeats
    patches = base[torch.randint(0, 7, (40,), generator=g)]
    # keys that collide for different patches must not merge them: the bytes decide
    keys = torch.zeros(40, dtype=torch.int64) if collide else None
    first, inverse = identical_groups(patches, keys)
    assert torch.equal(patches[first][inverse], patches)
    flat = patches.flatten(1)
    assert len(first) == len(torch.unique(flat, dim=0))
    for group, index in enumerate(first.tolist()):  # the first copy in patch order
        same = (flat == flat[index]).all(1).nonzero().flatten()
        assert int(same.min()) == index and torch.all(inverse[same] == group)


def test_content_keys_are_equal_exactly_for_equal_patches():
    g = torch.Generator().manual_seed(1)
    patches = torch.randint(0, 3, (30, 1, 2, 2), generator=g, dtype=torch.uint8)
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 5:] = False
    raw = patches[valid.flatten()]
    keys = content_keys(raw, valid)
    flat = raw.flatten(1)
    same_content = (flat[:, None] == flat[None]).all(-1)
    assert torch.equal(keys[valid][:, None] == keys[valid][None], same_content)
    assert len(set(keys[~valid].tolist()) | set(keys[valid].tolist())) == len(
        set(keys[valid].tolist())
    ) + int((~valid).sum())  # padded entries collide with nothing


def _prefers_blank(x: torch.Tensor) -> torch.Tensor:
    """An encoder whose single feature is the negative brightness: blank scores highest."""
    return -x.float().flatten(1).mean(1, keepdim=True).repeat(1, D) / 255


def _brightness_pool() -> CrossAttentionPool:
    pool = CrossAttentionPool(embed_dim=D, num_heads=1, head_dim=D, mlp_dim=4, num_queries=1)
    with torch.no_grad():
        pool.queries.fill_(1.0)
        pool.attn.q_proj.weight.copy_(torch.eye(D))
        pool.attn.q_proj.bias.zero_()
        pool.attn.k_proj.weight.copy_(torch.eye(D))
    return pool


def test_distinct_memory_keeps_one_copy_of_identical_patches():
    patches = _blank_heavy(b=1, n=30)
    pool = _brightness_pool()
    plain = _select(patches, _prefers_blank, pool, 6, 5)
    assert all(int(i) % 3 == 0 for i in plain.ids[0])  # collapsed onto blank copies
    guarded = _select(patches, _prefers_blank, pool, 6, 5, distinct=True)
    kept = guarded.ids[0][guarded.mask[0]]
    assert sum(int(i) % 3 == 0 for i in kept) == 1
    brightness = patches[0].float().flatten(1).mean(1)
    others = [i for i in range(30) if i % 3]
    darkest = sorted(others, key=lambda i: float(brightness[i]))[:5]
    assert set(kept.tolist()) - {int(i) for i in kept if int(i) % 3 == 0} == set(darkest)


def test_observe_sees_a_score_for_every_patch():
    encoder, pool = _parts(num_heads=2, num_queries=2)
    features = torch.randn(2, 33, F_DIM)
    seen = torch.zeros(2, 33, dtype=torch.bool)
    last = torch.zeros(2, 33)

    def observe(ids, scores, valid):
        for b in range(2):
            seen[b, ids[b][valid[b]]] = True
            last[b, ids[b][valid[b]]] = scores[b][valid[b]]

    sel = _select(features, encoder, pool, 5, 4, observe=observe)
    assert bool(seen.all())
    assert torch.allclose(last.gather(1, sel.ids), sel.scores)
