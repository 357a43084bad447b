"""The dense vision warm-up objective: linear heads on the ViT's patch tokens predict the per-patch
labels of the mini world (colour, shape, object centres, characters). The heads exist only during
that stage; the checkpoint keeps the ViT they trained."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.data.world.dense import HEADS
from internvl35.models.vit import InternVisionModel


BACKGROUND_WEIGHT = 0.2


class DenseWarmup(nn.Module):
    """The ViT plus one linear layer per label; `forward` returns the summed per-patch cross-entropy."""

    def __init__(self, vision_model: InternVisionModel, hidden_size: int, select_layer: int, seed: int = 0) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.select_layer = select_layer
        # a norm first, as in mlp1: the selected layer's output is not normalised
        self.heads = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, sum(HEADS.values())))
        # own generator: the heads' init must not move the global RNG that exact resume restores
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.heads[1].weight.normal_(0.0, 0.02, generator=g)
            self.heads[1].bias.zero_()

    def forward(self, pixel_values: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
        """tiles [T, 3, S, S], targets [T, P, len(HEADS)] -> sum over patches and labels of CE x scale."""
        vit = self.vision_model(pixel_values, self.select_layer)[:, 1:]
        logits = self.heads(vit).split(list(HEADS.values()), dim=-1)
        loss = sum(F.cross_entropy(lg.flatten(0, 1).float(), targets[..., k].flatten(), reduction="sum",
                                   weight=self._class_weights(lg.shape[-1]).to(lg.device))
                   for k, lg in enumerate(logits))
        return loss * scale

    @staticmethod
    def _class_weights(n: int) -> torch.Tensor:
        # most patches are background, and object centres and characters are rare: without this the
        # heads learn "nothing here" first and the rare labels last
        w = torch.ones(n)
        w[0] = BACKGROUND_WEIGHT
        return w

    @torch.no_grad()
    def accuracy(self, pixel_values: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Per-label accuracy over the patches whose label is not background (0)."""
        vit = self.vision_model(pixel_values, self.select_layer)[:, 1:]
        logits = self.heads(vit).split(list(HEADS.values()), dim=-1)
        out = {}
        for k, (name, lg) in enumerate(zip(HEADS, logits)):
            t = targets[..., k]
            fg = t > 0
            out[name] = float((lg.argmax(-1)[fg] == t[fg]).float().mean()) if fg.any() else float("nan")
        return out
