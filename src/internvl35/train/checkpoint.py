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

from internvl35.data.tokenizer import Tokenizer
from internvl35.models.internvl import InternVLModel
from internvl35.weights.convert import write_checkpoint


def save(out: Path, model: InternVLModel, tokenizer: Tokenizer, optimizer: torch.optim.Optimizer,
         scheduler: Any, state: dict[str, Any]) -> Path:
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(model, tokenizer, tmp, "custom", torch.float32)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "train_state.pt")
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
