"""Streaming checkpoint loader and writer.

`load_weights` builds the model on the meta device, allocates it once in the compute dtype and copies
each checkpoint tensor into its (slice of a) parameter, shard by shard: peak memory is the model plus
one tensor. Every key is resolved and shape-checked from the headers before any data is read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from internvl35.config import ModelConfig
from internvl35.errors import CheckpointError
from internvl35.models.internvl import InternVLModel
from internvl35.weights.keymap import Target, custom_to_hf, internal_to_custom, resolve
from internvl35.weights.safetensors_stream import SafetensorsReader

INDEX = "model.safetensors.index.json"
_IGNORED = (".rotary_emb.inv_freq",)


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files, from the shard index when there is one."""
    index = path / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: {INDEX} lists {len(missing)} missing shard(s): {missing[:3]}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    return files


def _dest(param: torch.Tensor, t: Target) -> torch.Tensor:
    dest = param if t.expert is None else param[t.expert]
    return dest if t.nparts == 1 else dest.chunk(t.nparts, dim=0)[t.part]


# Which parameters a process loads: the decoupled vision server needs only the vision side (ViT,
# projectors, Flash router), the language server only the LLM; the rest stays on the meta device.
PARTS = {"all": lambda name: True,
         "vision": lambda name: not name.startswith("language_model."),
         "language": lambda name: name.startswith("language_model.")}


def _plan(model: torch.nn.Module, readers: list[SafetensorsReader], fmt: str, part: str = "all"
          ) -> list[tuple[SafetensorsReader, str, Target]]:
    every = dict(model.named_parameters())
    params = {n: p for n, p in every.items() if PARTS[part](n)}
    filled: dict[str, int] = defaultdict(int)
    plan, unexpected = [], []
    for r in readers:
        for key, entry in r.entries.items():
            if key.endswith(_IGNORED):
                continue
            t = resolve(key, fmt)
            if t.param not in params:
                if t.param not in every:
                    unexpected.append(key)
                continue
            want = tuple(_dest(params[t.param], t).shape)
            if entry.shape != want:
                raise CheckpointError(f"shape mismatch for {key}: checkpoint {list(entry.shape)}, "
                                      f"model expects {list(want)}")
            filled[t.param] += _dest(params[t.param], t).numel()
            plan.append((r, key, t))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected key(s) in checkpoint: {', '.join(unexpected[:3])}")
    missing = [n for n, p in params.items() if filled[n] != p.numel()]
    if missing:
        raise CheckpointError(f"{len(missing)} key(s) missing from checkpoint: {', '.join(missing[:3])}")
    return plan


def load_weights(path: Path, cfg: ModelConfig, fmt: str, dtype: torch.dtype,
                 device: str | torch.device = "cpu", part: str = "all") -> InternVLModel:
    """Build `InternVLModel(cfg)` and fill it from the checkpoint at `path` (format `fmt`); with
    `part` "vision" or "language" only that side is allocated and read."""
    readers = [SafetensorsReader(f) for f in weight_files(path)]
    keys = {k for r in readers for k in r.entries}
    head = "language_model.lm_head.weight" if fmt == "custom" else "lm_head.weight"
    legacy_head = "language_model.lm_head.weight"
    tie = head not in keys and legacy_head not in keys  # tie only when the checkpoint has no head
    with torch.device("meta"):
        model = InternVLModel(cfg, tie_embeddings=tie)
    model = model.to(dtype)
    for name, child in model.named_children():
        if any(PARTS[part](f"{name}.{n}") for n, _ in child.named_parameters()):
            child.to_empty(device=device)
    with torch.no_grad():
        for r, key, t in _plan(model, readers, fmt, part):
            _dest(model.get_parameter(t.param), t).copy_(r.read(key))
    return model.eval()


def checkpoint_tensors(model: InternVLModel, fmt: str, dtype: torch.dtype,
                       params: dict[str, torch.Tensor] | None = None):
    """Yield (key, tensor) of `model` (or of a full state dict `params` of it) in format `fmt`."""
    num_experts = model.cfg.text.moe.num_experts if model.cfg.text.moe else 0
    for name, p in (params or dict(model.named_parameters())).items():
        for custom, expert, part, n in internal_to_custom(name, num_experts):
            t = _dest(p.detach(), Target(name, expert, part, n))
            if fmt == "custom":
                yield custom, t.to(dtype).contiguous()
                continue
            for hf_key, hpart, hn in custom_to_hf(custom):
                yield hf_key, t.chunk(hn, dim=0)[hpart].to(dtype).contiguous()


def save_weights(model: InternVLModel, out: Path, fmt: str, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = 4 << 30, params: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write safetensors shards (+ index when more than one) in checkpoint format `fmt`."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in checkpoint_tensors(model, fmt, dtype, params):
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return [out / "model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [out / n for n in names]
