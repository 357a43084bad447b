"""Training configuration, read from YAML. Stages run in order and share one loop; each stage sets
its steps, learning rate, frozen parts and data mix."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataSource:
    source: str = "world"  # "world" (the mini world) or "jsonl"
    weight: float = 1.0
    path: str | None = None  # jsonl file
    root: str | None = None  # folder the jsonl's image paths are relative to
    families: dict[str, float] = field(default_factory=dict)  # world: family -> weight
    jpeg_augment: bool = False
    easy: bool = False  # world: curriculum scenes (one large object where the task allows)
    big_text: bool = False  # world: reading curriculum with large glyphs
    followups: bool = False  # world: more questions about the same images as further turns


@dataclass
class Stage:
    name: str = "sft"
    steps: int = 100
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    freeze: list[str] = field(default_factory=list)  # any of "vision", "projector", "llm"
    # "lm": the language loss on conversations; "dense": the ViT alone learns per-patch labels of the
    # mini world (a vision warm-up before the language stages)
    objective: str = "lm"
    batch_tiles: int = 64  # dense: tiles per optimizer step
    data: list[DataSource] = field(default_factory=lambda: [DataSource()])


@dataclass
class TrainConfig:
    out_dir: str = "runs/mini"
    model: str = "mini"  # preset name (fresh init) or checkpoint directory (fine-tune)
    # preset fields to change for a fresh init, nested by section: {vision: {image_size: 224}, text: {...}}
    model_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # directory with tokenizer.json; None: checkpoint's, or trained on the world
    vocab_size: int = 1024  # for a tokenizer trained on the world
    stages: list[Stage] = field(default_factory=lambda: [Stage()])
    seed: int = 0
    max_tokens: int = 1024  # tokens per packed sequence (one micro-batch)
    grad_accum: int = 4  # micro-batches per optimizer step (across all ranks)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    precision: str = "fp32"  # or "bf16" (autocast)
    device: str = "auto"  # "auto" (the GPU of this process if any, else the CPU), "cpu", "cuda", "cuda:1"
    data_workers: int = 0  # processes that render and tokenize examples ahead (for GPUs; 0: in-process)
    max_tiles: int | None = None  # per image; default: the model's max_dynamic_patch
    save_every: int = 100
    log_every: int = 1
    eval_every: int = 0  # held-out accuracy (dense stages) or loss (language stages) every N steps; 0: never
    gradient_checkpointing: bool = False
    threads: int | None = None

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def _build(cls, raw: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    return cls(**raw)


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    stages = [_build(Stage, {**s, "data": [_build(DataSource, d) for d in s.get("data", [{}])]})
              for s in raw.pop("stages", [{}])]
    cfg = _build(TrainConfig, raw)
    cfg.stages = stages
    cfg.betas = tuple(cfg.betas)
    return cfg
