"""InternVL: ViT -> pixel shuffle -> MLP projector -> LLM, with the optional Flash router.

`encode_images` is separate from `forward` so the same module serves the plain forward, the engine,
and the two halves of decoupled (vision server / language server) deployment.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.config import ModelConfig
from internvl35.models.layers import AttentionCache
from internvl35.models.projector import (CrossAttentionPooling, Gating, flash_compress_decision, make_mlp1,
                                         make_mlp2, pixel_shuffle)
from internvl35.models.qwen3 import Qwen3ForCausalLM
from internvl35.models.vit import InternVisionModel


class InternVLModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tie_embeddings: bool | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        C, D = cfg.vision.hidden_size, cfg.text.hidden_size
        self.vision_model = InternVisionModel(cfg.vision)
        self.mlp1 = make_mlp1(C, D, cfg.downsample_ratio)
        self.language_model = Qwen3ForCausalLM(cfg.text, tie_embeddings)
        if cfg.flash is not None:
            self.mlp2 = make_mlp2(C, D, cfg.downsample_ratio / 2)
            self.pooling_before_gating = CrossAttentionPooling(C)
            self.gating = Gating(C)
        # Resolved from the checkpoint's tokenizer by the loader; the model itself never tokenizes.
        self.image_token_id: int | None = None

    # --- vision side ---------------------------------------------------------------------------
    def vit_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, S, S] -> ViT patch tokens without CLS [N, P, C]."""
        return self.vision_model(pixel_values, self.cfg.select_layer)[:, 1:]

    def project(self, vit: torch.Tensor) -> torch.Tensor:
        """[N, P, C] -> [N, 256, D] (pixel shuffle 0.5 + mlp1)."""
        return self.mlp1(pixel_shuffle(vit, self.cfg.downsample_ratio))

    def project_flash(self, vit: torch.Tensor) -> torch.Tensor:
        """[N, P, C] -> [N, 64, D] (pixel shuffle 0.25 + mlp2)."""
        return self.mlp2(pixel_shuffle(vit, self.cfg.downsample_ratio / 2))

    def router_logits(self, vit: torch.Tensor) -> torch.Tensor:
        """[N, P, C] -> [N, 2]; softmax(...)[:, 0] is the probability that 64 tokens suffice."""
        return self.gating(self.pooling_before_gating(vit))

    def encode_images(self, pixel_values: torch.Tensor, flash: tuple[float, float] | None = None
                      ) -> tuple[torch.Tensor, list[int]]:
        """All tiles of one request [N, 3, S, S] -> (features [M, D], tokens per tile).

        `flash=(relative, absolute)` runs the router over the request's tiles and keeps 64 tokens for
        the tiles it compresses; without it every tile gets 256 tokens (Flash weights unused).
        """
        return self.features_from_vit(self.vit_tokens(pixel_values), [pixel_values.shape[0]], [flash])[0]

    def encode_requests(self, pixel_values: list[torch.Tensor], flash: list[tuple[float, float] | None]
                        ) -> list[tuple[torch.Tensor, list[int]]]:
        """Several requests' tiles in one ViT pass (larger matmuls: 126 mini tiles took 0.55-0.65 s
        together vs 0.9-1.0 s request by request), then one pass of each projector over them."""
        vit = self.vit_tokens(pixel_values[0] if len(pixel_values) == 1 else torch.cat(pixel_values))
        return self.features_from_vit(vit, [pv.shape[0] for pv in pixel_values], flash)

    def features_from_vit(self, vit: torch.Tensor, sizes: list[int], flash: list[tuple[float, float] | None]
                          ) -> list[tuple[torch.Tensor, list[int]]]:
        """The projector (and router) half of `encode_requests`: ViT tokens [N, P, C] of requests with
        `sizes` tiles each -> per request (features [M, D], tokens per tile).

        The router decides per request (its quantile spans the request's tiles); then each tile goes
        through its own projector only, each projector once over all its tiles (vit-heavy model, two
        7-tile requests on one thread: 14.6 ms, vs 19.5 ms request by request and 24.1 ms with both
        projectors over every tile; identical features).
        """
        bounds = list(itertools.accumulate(sizes, initial=0))
        routed = [i for i, f in enumerate(flash) if f is not None]
        if not routed:
            full = self.project(vit)  # [N, 256, D]
            return [(full[a:b].reshape(-1, full.shape[-1]), [full.shape[1]] * (b - a))
                    for a, b in zip(bounds, bounds[1:])]
        if self.cfg.flash is None:
            raise ValueError("flash thresholds given but this checkpoint has no Flash router")
        rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in routed]).to(vit.device)
        p = F.softmax(self.router_logits(vit[rows]).float(), dim=-1)[:, 0]
        compress = torch.zeros(vit.shape[0], dtype=torch.bool, device=vit.device)
        done = 0
        for i in routed:
            compress[bounds[i]:bounds[i + 1]] = flash_compress_decision(p[done:done + sizes[i]], *flash[i])
            done += sizes[i]
        n = int(compress.sum())
        small = iter(self.project_flash(vit[compress]) if n else ())  # [n, 64, D]
        full = iter(self.project(vit[~compress]) if n < len(compress) else ())  # [N - n, 256, D]
        tiles = [next(small) if c else next(full) for c in compress.tolist()]
        return [(torch.cat(tiles[a:b]), [t.shape[0] for t in tiles[a:b]]) for a, b in zip(bounds, bounds[1:])]

    # --- language side -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with every <IMG_CONTEXT> position overwritten by the next feature row."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # [B, L, D]
        if image_features is None:
            return embeds
        if self.image_token_id is None:
            raise ValueError("image_token_id is not set; load the model with its tokenizer")
        slots = input_ids == self.image_token_id
        n = int(slots.sum())
        if n != image_features.shape[0]:
            raise ValueError(f"image features and image tokens do not match: tokens {n}, "
                             f"features {image_features.shape[0]}")
        return embeds.masked_scatter(slots[..., None], image_features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                image_features: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: AttentionCache | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids [B, L] with expanded <IMG_CONTEXT> tokens -> logits [B, L, V] ([B, 1, V] if last_only).

        `attention_mask` [B, L] (1 = token, 0 = left padding) is honoured when no cache is given;
        `mask` [B, 1, L, L] (True = attend) replaces it, e.g. block-diagonal masks of packed sequences.
        """
        if pixel_values is not None and image_features is None:
            image_features, _ = self.encode_images(pixel_values)
        h = self.embed(input_ids, image_features)
        if positions is None:
            if attention_mask is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            else:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if mask is None and attention_mask is not None and cache is None:
            mask = padded_causal_mask(attention_mask.bool())
        h = self.language_model.model(h, positions, cache, mask)
        if last_only:
            h = h[:, -1:]
        return self.language_model.logits(h)


def padded_causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid [B, L] -> boolean [B, 1, L, L]: causal, padding keys hidden; every query sees itself so
    padded rows stay finite."""
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def flash_keep_mask(input_ids: torch.Tensor, image_token_id: int, tokens_per_tile: list[int],
                    tile_tokens: int) -> torch.Tensor:
    """Positions [L] of a 1-D prompt to keep after Flash compaction: a compressed tile keeps the first
    `tokens_per_tile[i]` of its `tile_tokens` <IMG_CONTEXT> slots; all other tokens stay."""
    slots = (input_ids == image_token_id).nonzero().flatten()
    if slots.numel() != tile_tokens * len(tokens_per_tile):
        raise ValueError(f"prompt has {slots.numel()} image tokens, expected {tile_tokens} x "
                         f"{len(tokens_per_tile)} tiles")
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for i, n in enumerate(tokens_per_tile):
        keep[slots[i * tile_tokens + n:(i + 1) * tile_tokens]] = False
    return keep
