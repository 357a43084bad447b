"""Distribution, applied from outside the model: FSDP2 (`fully_shard`) over the ViT blocks, the LLM
blocks and the root, on gloo (CPU) or nccl (GPU). One process needs none of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @classmethod
    def init(cls) -> Dist:
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def all_reduce_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def all_reduce_grads(self, module: nn.Module) -> None:
        """Sum the gradients of an unsharded module across processes."""
        if self.world > 1:
            for q in module.parameters():
                if q.grad is not None:
                    dist.all_reduce(q.grad)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def save(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (a checkpoint write) on rank 0 only; the others wait for it."""
        result = fn() if self.rank == 0 else None
        self.barrier()
        return result


def parallelize(model: nn.Module, d: Dist) -> nn.Module:
    """Shard `model` with FSDP2 when running on several processes; otherwise return it unchanged."""
    if d.world == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    if getattr(model, "_fsdp_applied", False):
        return model
    for layer in model.vision_model.encoder.layers:
        fully_shard(layer)
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model._fsdp_applied = True
    return model
