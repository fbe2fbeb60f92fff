from __future__ import annotations

import pytest
import torch

from ips.aggregation import CrossAttentionPool, sinusoidal_1d, sinusoidal_2d


def _pool(**kw):
    torch.manual_seed(0)
    return CrossAttentionPool(
        embed_dim=16, num_heads=4, head_dim=4, mlp_dim=32, num_queries=3, dropout=0.0, **kw
    ).eval()


def test_pooling_shapes_and_attention_sum_to_one():
    pooled, weights = _pool()(torch.randn(2, 11, 16))
    assert pooled.shape == (2, 3, 16)
    assert weights.shape == (2, 4, 3, 11)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, 3))


def test_pooling_ignores_order_of_patches():
    pool, x = _pool(), torch.randn(1, 9, 16)
    perm = torch.randperm(9)
    assert torch.allclose(pool(x)[0], pool(x[:, perm])[0], atol=1e-6)


def test_masked_patches_get_zero_weight_and_change_nothing():
    pool, x = _pool(), torch.randn(1, 8, 16)
    padded = torch.cat([x, 50 * torch.randn(1, 5, 16)], 1)
    mask = torch.tensor([[True] * 8 + [False] * 5])
    pooled, weights = pool(padded, mask)
    assert torch.all(weights[..., 8:] == 0)
    assert torch.allclose(pooled, pool(x)[0], atol=1e-6)
    scores = pool.scores(padded, mask)
    assert torch.all(scores[:, 8:] == 0)
    assert torch.allclose(scores[:, :8], pool.scores(x), atol=1e-6)


def test_scores_average_heads_then_queries():
    pool, x = _pool(), torch.randn(2, 7, 16)
    weights = pool(x)[1]
    assert torch.allclose(pool.scores(x), weights.mean(1).mean(1))
    assert torch.allclose(pool.scores(x).sum(-1), torch.ones(2))


def test_sinusoidal_encodings():
    pe = sinusoidal_1d(torch.arange(5), 8)
    assert pe.shape == (5, 8)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0] * 4))
    assert torch.allclose(pe[3, 0], torch.sin(torch.tensor(3.0)))
    pe2 = sinusoidal_2d(torch.tensor([1, 1]), torch.tensor([2, 3]), 8)
    assert torch.equal(pe2[0, :4], pe2[1, :4]) and not torch.equal(pe2[0, 4:], pe2[1, 4:])
    with pytest.raises(ValueError, match="even"):
        sinusoidal_1d(torch.arange(3), 7)
