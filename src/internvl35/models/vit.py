"""InternViT: the vision encoder. One definition serves InternViT-300M (LayerNorm, qkv bias) and
InternViT-6B (RMSNorm, q/k-norm over all heads, no qkv bias); parameter names match the checkpoints."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.config import VisionConfig
from internvl35.models.layers import Linear, RMSNorm, attention, linear_gelu


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        C, P = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, C))
        self.patch_embedding = nn.Conv2d(3, C, kernel_size=P, stride=P)
        self.position_embedding = nn.Parameter(torch.randn(1, cfg.grid**2 + 1, C))

    def _positions(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding
        grid = int((pos.shape[1] - 1) ** 0.5)
        if (h, w) == (grid, grid):
            return pos
        # Inputs of another size: bicubic-resize the patch part of the table in fp32, as released.
        patch = pos[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False)
        patch = patch.reshape(1, -1, h * w).permute(0, 2, 1).to(pos.dtype)
        return torch.cat([pos[:, :1], patch], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, 1 + (S/P)^2, C]."""
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [N, C, h, w]
        N, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [N, h*w, C]
        cls = self.class_embedding.expand(N, 1, C).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self._positions(h, w).to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = Linear(C, 3 * C, bias=cfg.qkv_bias)
        self.proj = Linear(C, C)
        if cfg.qk_norm:  # 6B: RMSNorm over all C channels, before the head split
            self.q_norm = RMSNorm(C, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(C, cfg.layer_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, P, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [N, P, C]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(N, P, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, causal=False)  # [N, H, P, Dh]
        return self.proj(out.transpose(1, 2).reshape(N, P, C))


class InternMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_gelu(x, self.fc1.weight, self.fc1.bias))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = _norm(cfg, C)
        self.attn = InternAttention(cfg)
        self.ls1 = nn.Parameter(torch.full((C,), cfg.layer_scale_init))
        self.norm2 = _norm(cfg, C)
        self.mlp = InternMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((C,), cfg.layer_scale_init))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Stochastic depth per sample; identity at eval time.
        if not self.training or self.drop_path == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep.to(x.dtype) / (1.0 - self.drop_path)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self._drop(self.attn(self.norm1(h).to(h.dtype)) * self.ls1)
        return h + self._drop(self.mlp(self.norm2(h).to(h.dtype)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        n = cfg.num_layers
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList(InternVisionEncoderLayer(cfg, r) for r in rates)


class InternVisionModel(nn.Module):
    """Tiles [N, 3, S, S] -> hidden states of layer `select_layer` [N, 1 + patches, C] (no final norm)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        layers = self.encoder.layers
        # hidden_states[0] is the embedding output, so layer -1 means "run every block".
        depth = select_layer if select_layer >= 0 else len(layers) + 1 + select_layer
        if not 0 <= depth <= len(layers):
            raise ValueError(f"select_layer {select_layer} out of range for {len(layers)} layers")
        h = self.embeddings(pixel_values)
        for layer in layers[:depth]:
            h = layer(h)
        return h
