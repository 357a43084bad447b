"""Losses. `square_weights` implements InternVL's square-root loss averaging: every loss token of an
example with N loss tokens weighs 1/sqrt(N); the loss is sum(w * CE) / sum(w) over the global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from internvl35.data.sft import IGNORE, Pack, block_causal_mask


def square_weights(labels: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Per-token weights [L] for next-token targets labels[1:] (aligned with logits[:-1])."""
    target = labels[1:]
    seg = segments[1:]
    active = target != IGNORE
    counts = torch.zeros(int(segments.max()) + 1, dtype=torch.float32).index_add_(0, seg, active.float())
    w = counts.clamp(min=1).rsqrt()[seg]
    return w * active


def weighted_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * CE) over positions: logits [L, V] predict labels[1:]."""
    target = labels[1:].clamp(min=0)
    ce = F.cross_entropy(logits[:-1].float(), target, reduction="none")
    return (ce * weights).sum()


def pack_loss_sum(model: torch.nn.Module, p: Pack, weights: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Forward of one pack (block-diagonal attention, positions restarting per example) and its
    sum(w * CE), under bf16 autocast when training in bf16."""
    with torch.autocast(p.input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(p.input_ids[None], p.pixel_values, positions=p.positions[None],
                       mask=block_causal_mask(p.segments))[0]
    return weighted_lm_loss_sum(logits, p.labels, weights)
