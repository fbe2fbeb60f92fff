"""Cross-attention pooling with learned queries, its selection score, positional encodings.

Letters: B images, N patches (or candidates), D embedding width, H heads, T query tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ips.errors import InputError

ROW_BLOCK = 64  # rows per block of `rows_times`


def rows_times(x: Tensor, w: Tensor) -> Tensor:
    """x (B, n, D) @ w (B, D, k) such that each row's result is the same whatever n and the
    rows beside it: (B, n, k).

    A CPU BLAS picks its kernel and its split of the work by the shape, and small or ragged
    row counts take paths whose sums round differently (a row alone, or one of 7, differs
    from the same row among 1024 in the last bit). Rows therefore go in whole blocks of
    ROW_BLOCK, the last block padded with zero rows; the rows of such products matched bit
    for bit at every count and offset tried, with one and two threads.
    """
    if x.shape[0] == 1:  # one image: a plain matrix product (a batched one is slower)
        wt = w[0].transpose(0, 1)  # (k, D)

        def times(rows: Tensor) -> Tensor:
            return nn.functional.linear(rows[0], wt)[None]
    else:

        def times(rows: Tensor) -> Tensor:
            return rows @ w

    n = x.shape[-2]
    whole = n - n % ROW_BLOCK
    if whole == n:
        return times(x)
    # the ragged tail, padded to one block (a copy of fewer than ROW_BLOCK rows)
    tail = nn.functional.pad(x[..., whole:, :], (0, 0, 0, ROW_BLOCK - (n - whole)))
    last = times(tail)[..., : n - whole, :]
    return torch.cat([times(x[..., :whole, :]), last], dim=-2) if whole else last


class CrossAttention(nn.Module):
    """Multi-head attention of T query tokens over N patch embeddings."""

    def __init__(self, *, embed_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner)
        # a key bias adds the same logit to every patch, which softmax ignores: leave it out
        self.k_proj = nn.Linear(embed_dim, inner, bias=False)
        self.v_proj = nn.Linear(embed_dim, inner)
        self.out_proj = nn.Linear(inner, embed_dim)
        # fold the queries into the key projection where that is cheaper (T < D_k): the same
        # logits in exact arithmetic, equal to float32 rounding; False computes every key
        self.fold_queries = True

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, n, D_k)

    def folded(self, queries: Tensor) -> Tensor | None:
        """The queries folded into the key projection, W_k^T q / sqrt(D_k): what a patch's
        embedding is multiplied with for its logits, q . (W_k x) = (W_k^T q) . x.

        Args:
            queries: (B, T, D).

        Returns:
            (B, H x T, D); None where each patch's keys are computed instead (``fold_queries``
            off, or T >= D_k, where folding saves nothing).
        """
        t = queries.shape[1]
        if not self.fold_queries or t >= self.head_dim:
            return None
        q = self._split(self.q_proj(queries))  # (B, H, T, D_k)
        b, h = q.shape[:2]
        w = self.k_proj.weight.view(h, self.head_dim, -1)  # (H, D_k, D)
        return (q / math.sqrt(self.head_dim) @ w).reshape(b, h * t, -1)

    def logits(self, queries: Tensor, x: Tensor, folded: Tensor | None = None) -> Tensor:
        """Attention logits before the softmax; each patch's depend on that patch alone.

        Args:
            queries: (B, T, D).
            x: (B, N, D) patch embeddings.
            folded: `folded` of the queries, (B or 1, H x T, D), if already known.

        Returns:
            (B, H, T, N).
        """
        if folded is None:
            folded = self.folded(queries)
        b, t = x.shape[0], queries.shape[1]
        if folded is None:  # the keys of every patch
            q = self._split(self.q_proj(queries))  # (B, H, T, D_k)
            k = self._split(self.k_proj(x))  # (B, H, N, D_k)
            return q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, N)
        # H x T products of width D per patch instead of a key projection of H x D_k outputs
        # (64x fewer multiply-adds for one task, D_k = 64); patches as rows of the product, in
        # whole blocks of rows: a row's bits depend neither on the rows beside it nor on how
        # many there are
        qk = folded.expand(b, -1, -1).transpose(-2, -1)  # (B, D, H x T)
        return rows_times(x, qk).transpose(-2, -1).view(b, self.num_heads, t, -1)

    def weights(self, queries: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attention weights, softmax over the patches.

        Args:
            queries: (B, T, D).
            x: (B, N, D) patch embeddings.
            mask: (B, N), True for real patches; padded patches get weight exactly 0.

        Returns:
            (B, H, T, N).
        """
        return masked_softmax(self.logits(queries, x), mask)

    def forward(
        self, queries: Tensor, x: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Returns the attended values (B, T, D) and the weights (B, H, T, N)."""
        weights = self.weights(queries, x, mask)  # (B, H, T, N)
        v = self._split(self.v_proj(x))  # (B, H, N, D_v)
        out = weights @ v  # (B, H, T, D_v)
        out = out.transpose(1, 2).flatten(2)  # (B, T, H * D_v)
        return self.out_proj(out), weights


class CrossAttentionPool(nn.Module):
    """Pools N patch embeddings into T task embeddings (one learned query per task).

    ``attention -> dropout -> + query -> LayerNorm -> MLP -> dropout -> + -> LayerNorm``.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int = 8,
        head_dim: int = 64,
        mlp_dim: int = 2048,
        num_queries: int = 1,
        dropout: float = 0.1,
        query_std: float = 1.0,
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, embed_dim) * query_std)  # (T, D)
        self.attn = CrossAttention(embed_dim=embed_dim, num_heads=num_heads, head_dim=head_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, mlp_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, embed_dim),
        )
        self.norm2 = nn.LayerNorm(embed_dim)

    def _queries(self, batch: int) -> Tensor:
        return self.queries.unsqueeze(0).expand(batch, -1, -1)  # (B, T, D)

    def folded_queries(self) -> Tensor | None:
        """The learned queries folded into the key projection (`CrossAttention.folded`), in
        float32: (1, H x T, D), the same for every image; None where they are not folded.
        Computed once for a whole selection pass, where the weights do not change."""
        with torch.autocast(device_type=self.queries.device.type, enabled=False):
            return self.attn.folded(self.queries[None].float())

    def logits(self, x: Tensor, folded: Tensor | None = None) -> Tensor:
        """Selection logits of every patch, in float32: what ``scores`` takes the softmax of.

        Args:
            x: (B, N, D) embeddings (positional encoding already added).
            folded: ``folded_queries()``, if already computed.

        Returns:
            (B, H, T, N).
        """
        # in float32 even under autocast: reduced precision makes near-equal scores tie, and
        # ties among many candidates turn the top-M choice into a lottery
        with torch.autocast(device_type=x.device.type, enabled=False):
            if folded is None:  # from the queries of one image: the same bits for any batch
                folded = self.folded_queries()
            return self.attn.logits(self._queries(x.shape[0]).float(), x.float(), folded)

    def scores(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Selection score of every patch: attention averaged over heads, then queries.

        Args:
            x: (B, N, D) embeddings (positional encoding already added).
            mask: (B, N), True for real patches.

        Returns:
            (B, N); padded patches score 0.
        """
        return selection_scores(self.logits(x), mask)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool.

        Args:
            x: (B, N, D).
            mask: (B, N), True for real patches.

        Returns:
            pooled (B, T, D) and attention weights (B, H, T, N).
        """
        queries = self._queries(x.shape[0])  # (B, T, D)
        attended, weights = self.attn(queries, x, mask)  # (B, T, D), (B, H, T, N)
        h = self.norm1(queries + self.dropout(attended))
        h = self.norm2(h + self.dropout(self.mlp(h)))
        return h, weights


def masked_softmax(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax over the patches of logits (B, H, T, N); where mask (B, N) is False the
    weight is exactly 0."""
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1)


def selection_scores(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Selection score of a set of patches from their logits: the softmax over the set,
    averaged over heads, then over queries.

    Args:
        logits: (B, H, T, N) selection logits (``CrossAttentionPool.logits``); a patch's do not
            depend on the other patches, so they can be computed once and concatenated.
        mask: (B, N), True for real patches.

    Returns:
        (B, N); padded patches score 0.
    """
    return masked_softmax(logits, mask).mean(dim=1).mean(dim=1)  # (B, H, T, N) -> (B, N)


def _frequencies(dim: int, device: torch.device) -> Tensor:
    return torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))


def sinusoidal_1d(positions: Tensor, dim: int) -> Tensor:
    """Fixed sinusoidal encoding of integer positions.

    Args:
        positions: (...) integer positions, e.g. raster patch indices.
        dim: even width D.

    Returns:
        (..., D) float32, sin on even and cos on odd channels.
    """
    if dim % 2:
        raise InputError(f"a 1-D sinusoidal encoding needs an even width, got {dim}")
    angles = positions.float().unsqueeze(-1) * _frequencies(dim, positions.device)  # (..., D/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def sinusoidal_2d(rows: Tensor, cols: Tensor, dim: int) -> Tensor:
    """Fixed 2-D encoding: half the channels encode the row, half the column.

    Args:
        rows, cols: (...) integer grid positions.
        dim: width D, a multiple of 4.

    Returns:
        (..., D).
    """
    if dim % 4:
        raise InputError(f"a 2-D sinusoidal encoding needs a width divisible by 4, got {dim}")
    return torch.cat([sinusoidal_1d(rows, dim // 2), sinusoidal_1d(cols, dim // 2)], dim=-1)


def masked_mean_entropy(weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """Entropy (nats) of attention distributions, averaged over heads and queries.

    Args:
        weights: (B, H, T, N) softmax weights.
        mask: (B, N).

    Returns:
        (B,).
    """
    plogp = weights * torch.log(weights.clamp_min(1e-12))
    if mask is not None:
        plogp = plogp * mask[:, None, None, :]
    return -plogp.sum(-1).mean(dim=(1, 2))


__all__ = [
    "CrossAttention",
    "CrossAttentionPool",
    "masked_mean_entropy",
    "masked_softmax",
    "selection_scores",
    "sinusoidal_1d",
    "sinusoidal_2d",
]
