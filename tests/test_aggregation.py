from __future__ import annotations

import pytest
import torch

from ips.aggregation import CrossAttentionPool, rows_times, sinusoidal_1d, sinusoidal_2d


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


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_logits_do_not_depend_on_the_rows_beside_it_or_their_number(threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        pool = CrossAttentionPool(embed_dim=128, num_heads=4, head_dim=32, num_queries=3)
        x = torch.randn(2, 700, 128, generator=g).relu()
        with torch.inference_mode():
            whole = pool.logits(x)  # (2, 4, 3, 700)
            for start, stop in [(0, 1), (5, 12), (64, 128), (3, 336), (100, 700), (699, 700)]:
                part = pool.logits(x[:, start:stop])
                assert torch.equal(part, whole[..., start:stop]), (start, stop)
            # the plain product agrees to rounding, and its ragged shapes do not always
            q = pool.attn._split(pool.attn.q_proj(pool._queries(2)))
            w = pool.attn.k_proj.weight.view(4, 32, -1)
            qk = (q / 32**0.5 @ w).reshape(2, 12, -1)
            plain = (x @ qk.transpose(-2, -1)).transpose(-2, -1).view(2, 4, 3, -1)
            torch.testing.assert_close(plain, whole)
    finally:
        torch.set_num_threads(previous)


def test_rows_times_is_the_matrix_product():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 130, 16, generator=g), torch.randn(3, 16, 5, generator=g)
    torch.testing.assert_close(rows_times(x, w), x @ w)
    assert rows_times(x[:, :0], w).shape == (3, 0, 5)
