"""Vision-to-language bridge: pixel shuffle, the projectors `mlp1` (256 tokens/tile) and `mlp2`
(Flash, 64 tokens/tile), and the Visual Resolution Router (cross-attention pooling + gating)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.models.layers import Linear


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """ViT tokens [N, P, C] on a square grid -> [N, P*ratio^2, C/ratio^2] (ps_version v2).

    Output token (i', j') concatenates x(i'/r + di, j'/r + dj) over di (outer) and dj (inner).
    """
    N, P, C = x.shape
    g = int(P**0.5)
    x = x.reshape(N, g, g, C)
    x = x.reshape(N, g, int(g * ratio), int(C / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(N, int(g * ratio), int(g * ratio), int(C / ratio**2)).permute(0, 2, 1, 3)
    return x.reshape(N, -1, int(C / ratio**2))


def make_mlp1(vit_dim: int, llm_dim: int, ratio: float) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear; indices 0/1/3 are the checkpoint key names."""
    width = int(vit_dim / ratio**2)
    return nn.Sequential(nn.LayerNorm(width), Linear(width, llm_dim), nn.GELU(), Linear(llm_dim, llm_dim))


def make_mlp2(vit_dim: int, llm_dim: int, ratio: float) -> nn.Sequential:
    """The Flash 64-token projector; indices 0/1/4/7 are the checkpoint key names."""
    width = int(vit_dim / ratio**2)
    return nn.Sequential(
        nn.LayerNorm(width), Linear(width, 2 * llm_dim), nn.GELU(), nn.Dropout(0.1),
        Linear(2 * llm_dim, 2 * llm_dim), nn.GELU(), nn.Dropout(0.1), Linear(2 * llm_dim, llm_dim))


class CrossAttentionPooling(nn.Module):
    """A learned query attends to a tile's ViT tokens. As released, attn2/norm2 are applied three
    times and attn3/attn4/norm3/norm4 exist in the checkpoint but are never used."""

    def __init__(self, dim: int, num_heads: int = 16) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(1, dim))
        for i in range(1, 5):
            setattr(self, f"attn{i}", nn.MultiheadAttention(dim, num_heads, batch_first=True))
            setattr(self, f"norm{i}", nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, P, C] -> [N, C]: the same function as nn.MultiheadAttention(query, x, x), computed
        for a single query without projecting the tokens. With q the projected query of head h,
        softmax(q . (W_k x_p + b_k)) = softmax((W_k^T q) . x_p), since q . b_k is the same for every
        token, and the weighted sum of W_v x_p + b_v is W_v (sum_p a_p x_p) + b_v, since the weights
        sum to one. So each application costs 2 x heads x P x C multiply-adds per tile, where
        projecting the tokens' keys and values cost 2 x P x C^2 per attention module (mini's
        192-wide ViT, 16 heads: the four applications now cost a sixth of the two projections)."""
        q = self.query_token.expand(x.shape[0], 1, -1).to(x.dtype)  # [N, 1, C]
        q = self.norm1(_attend_tokens(self.attn1, q, x))
        for _ in range(3):
            q = self.norm2(_attend_tokens(self.attn2, q, x))
        return q[:, 0]


def _attend_tokens(attn: nn.MultiheadAttention, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention(q, x, x) for one query per tile: q [N, 1, C], x [N, P, C] -> [N, 1, C]
    (no dropout, no mask), through the identities in `CrossAttentionPooling.forward`."""
    N, _, C = x.shape
    H = attn.num_heads
    _, w_k, w_v = attn.in_proj_weight.view(3, H, C // H, C).unbind(0)  # each [H, d, C]
    b = attn.in_proj_bias
    q = F.linear(q[:, 0], attn.in_proj_weight[:C], None if b is None else b[:C]).view(N, H, C // H)
    u = torch.einsum("nhd,hdc->nhc", q * (C // H) ** -0.5, w_k)  # each head's query in token space
    weights = torch.softmax(torch.bmm(u, x.transpose(1, 2)), dim=-1)  # [N, H, P]
    pooled = torch.bmm(weights, x)  # [N, H, C]: each head's weighted mean token
    o = torch.einsum("nhc,hdc->nhd", pooled, w_v).reshape(N, C)
    if b is not None:
        o = o + b[2 * C:]
    return attn.out_proj(o)[:, None]


class Gating(nn.Module):
    """Four residual MLP blocks, then LayerNorm + Linear(C, 2); softmax over {compress, keep}."""

    def __init__(self, dim: int, expansion: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"block{i}", nn.Sequential(
                Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(dropout),
                Linear(expansion * dim, dim), nn.Dropout(dropout), nn.LayerNorm(dim)))
        self.gate = nn.Sequential(nn.LayerNorm(dim), Linear(dim, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, 2]; softmax(...)[:, 0] is the probability that 64 tokens suffice."""
        for i in range(1, 5):
            x = x + getattr(self, f"block{i}")(x)
        return self.gate(x)


def flash_compress_decision(p_compress: torch.Tensor, relative: float, absolute: float) -> torch.Tensor:
    """Tiles [T] to compress: above the `relative` quantile over all tiles of the request (strict, so
    a single tile is never compressed) and at least `absolute`."""
    thr = torch.quantile(p_compress.float(), relative)
    return (p_compress > thr) & (p_compress >= absolute)
