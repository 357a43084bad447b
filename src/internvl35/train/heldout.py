"""Held-out measurements during training (`eval_every`): a fixed batch drawn from the stage's own
data mix under another seed. A dense stage reports the per-label accuracy of its heads on object
patches (what the vision warm-up is for: colour, shape, centres, characters); a language stage
reports its square-averaged loss. Nothing here touches the training RNG or data position, so a
resumed run stays exact."""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from internvl35.data.sft import pack_stream
from internvl35.train.data import ExampleSource
from internvl35.train.losses import pack_loss_sum, square_weights

HELDOUT_SEED_OFFSET = 10_007  # far from any training seed's examples
DENSE_TILES = 128
LM_PACKS = 4


class HeldOut:
    def __init__(self, source: ExampleSource, dense: bool, max_tokens: int, device: torch.device,
                 bf16: bool = False) -> None:
        self.dense, self.bf16 = dense, bf16
        if dense:
            _, x, y = source.dense_batch(0, DENSE_TILES)
            self.batch = (x.to(device), y.to(device))
        else:
            self.packs = [p.to(device) for _, p in islice(pack_stream(source.stream(0), max_tokens), LM_PACKS)]

    @torch.no_grad()
    def measure(self, module: nn.Module) -> dict[str, float]:
        was_training = module.training
        module.eval()
        try:
            if self.dense:
                acc = module.accuracy(*self.batch)
                return {f"heldout_{k}": round(v, 4) for k, v in acc.items() if v == v}  # skip NaN (absent)
            num = den = 0.0
            for p in self.packs:
                w = square_weights(p.labels, p.segments)
                num += float(pack_loss_sum(module, p, w, self.bf16))
                den += float(w.sum())
            return {"heldout_loss": round(num / max(den, 1e-9), 4)}
        finally:
            module.train(was_training)
