"""Atomic training checkpoints: the model as a loadable checkpoint directory (custom format, fp32)
plus optimizer, scheduler, RNG and data position. Written to a temporary folder and renamed, so a
run killed at any moment resumes from the last complete checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from internvl35.data.tokenizer import Tokenizer
from internvl35.models.internvl import InternVLModel
from internvl35.weights.convert import write_checkpoint


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, owner: torch.nn.Module | None = None
               ) -> tuple[dict, dict]:
    """Unsharded model and optimizer state (a collective under FSDP: every rank must call it). The
    optimizer state is keyed by parameter name within `owner` (the module the optimizer trains, the
    model by default), so any process count can resume it."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(owner if owner is not None else model, optimizer, options=opts))


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    # strict=False: parameters that never received a gradient (e.g. the unused Flash modules) have no state
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, strict=False))


def save(out: Path, model: InternVLModel, tokenizer: Tokenizer, params: dict, optimizer_state: dict,
         scheduler: Any, state: dict[str, Any], aux: dict | None = None) -> Path:
    """Write on one process, from `full_state` results; `aux` holds stage-only modules (dense heads)."""
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(model, tokenizer, tmp, "custom", torch.float32, params=params)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "aux": aux,
                "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None},
               tmp / "train_state.pt")
    (tmp / "train_state.json").write_text(json.dumps(state, indent=2))
    _fsync_dir(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def restore_rng(blobs: dict[str, Any]) -> None:
    torch.set_rng_state(blobs["torch_rng"])
    if blobs.get("cuda_rng") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(blobs["cuda_rng"])


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint (also after a crash between the two renames)."""
    for name in ("checkpoint", "checkpoint.old"):
        p = out / name
        if (p / "train_state.json").is_file():
            return p
    return None


def load_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state = json.loads((ckpt / "train_state.json").read_text())
    blobs = torch.load(ckpt / "train_state.pt", weights_only=False)
    return state, blobs
