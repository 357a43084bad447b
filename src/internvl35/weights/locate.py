"""Where a model lives: a checkpoint directory, or "mini" for the checkpoint inside the package."""

from __future__ import annotations

from pathlib import Path

from internvl35.config import CONFIGS
from internvl35.errors import CheckpointError

MINI_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini"


def resolve_path(path_or_preset: str | Path) -> Path:
    p = Path(path_or_preset)
    if p.is_dir():
        return p
    if str(path_or_preset) == "mini":
        if not (MINI_DIR / "config.json").is_file():
            raise CheckpointError("the embedded mini checkpoint is not present in this installation")
        return MINI_DIR
    if str(path_or_preset) in CONFIGS:
        raise CheckpointError(f"preset {path_or_preset!r} has no bundled weights: pass a checkpoint directory")
    raise CheckpointError(f"{path_or_preset}: not a checkpoint directory or known model name")
