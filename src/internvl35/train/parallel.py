"""Distribution, applied from outside the model: FSDP2 (`fully_shard`) over the ViT blocks, the LLM
blocks and the root, on gloo (CPU) or nccl (GPU, one per process: LOCAL_RANK). One process needs
none of it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from internvl35.hardware import check_device


def resolve_device(name: str = "auto") -> torch.device:
    """'auto': this process's GPU when there is one (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(name)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def init(cls, device: str = "auto") -> Dist:
        dev = resolve_device(device)
        if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls(device=dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev)

    def all_reduce_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if getattr(model, "_fsdp_applied", False):
        return model
    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in model.vision_model.encoder.layers:
        fully_shard(layer, mesh=mesh)
    for layer in model.language_model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model._fsdp_applied = True
    return model
