"""Vision-to-language bridge: pixel shuffle, the projectors `mlp1` (256 tokens/tile) and `mlp2`
(Flash, 64 tokens/tile), and the Visual Resolution Router (cross-attention pooling + gating)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.models.layers import Linear, linear


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
        """[N, P, C] -> [N, C]. Written out (the same products as nn.MultiheadAttention) so that
        attn2's keys and values of the tokens are projected once for its three applications: the
        pooling cost halves (the router was 11 of the 12 ms a 7-tile request spent after the mini ViT)."""
        q = self.query_token.expand(x.shape[0], 1, -1).to(x.dtype)  # [N, 1, C]
        q = self.norm1(_attend(self.attn1, q, *_keys_values(self.attn1, x)))
        kv = _keys_values(self.attn2, x)
        for _ in range(3):
            q = self.norm2(_attend(self.attn2, q, *kv))
        return q[:, 0]


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[N, L, C] -> [N, heads, L, C / heads]."""
    N, L, C = t.shape
    return t.view(N, L, num_heads, C // num_heads).transpose(1, 2)


def _keys_values(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    C = x.shape[-1]
    bias = attn.in_proj_bias[C:] if attn.in_proj_bias is not None else None
    # every token of every tile: a product large enough for oneDNN where `linear` takes it
    k, v = linear(x, attn.in_proj_weight[C:], bias).chunk(2, dim=-1)
    return _heads(k, attn.num_heads), _heads(v, attn.num_heads)


def _attend(attn: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention(q, x, x) given x's projected keys/values (no dropout, no mask)."""
    C = q.shape[-1]
    bias = attn.in_proj_bias[:C] if attn.in_proj_bias is not None else None
    o = F.scaled_dot_product_attention(_heads(F.linear(q, attn.in_proj_weight[:C], bias), attn.num_heads), k, v)
    return attn.out_proj(o.transpose(1, 2).reshape(q.shape))


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
