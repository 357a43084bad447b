"""Checkpoint facts read from config.json and safetensors headers only (no weights loaded)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from internvl35.weights.locate import resolve_path
from internvl35.weights.config_json import config_from_dict, read_config_json
from internvl35.weights.keymap import resolve
from internvl35.weights.loader import weight_files
from internvl35.weights.safetensors_stream import SafetensorsReader


def describe(path_or_name: str | Path) -> dict[str, object]:
    path = resolve_path(path_or_name)
    cfg, fmt = config_from_dict(read_config_json(path), name=path.name)
    files = weight_files(path)
    counts: Counter[str] = Counter()
    dtypes: Counter[str] = Counter()
    for f in files:
        for key, e in SafetensorsReader(f).entries.items():
            n = math.prod(e.shape)
            part = resolve(key, fmt).param.split(".")[0]
            counts[{"vision_model": "vision", "language_model": "language"}.get(part, "projector/router")] += n
            dtypes[str(e.dtype).replace("torch.", "")] += n
    total = sum(counts.values())
    t = cfg.text
    return {
        "name": cfg.name, "format": "custom (InternVLChatModel)" if fmt == "custom" else "hf (transformers)",
        "llm": f"{t.arch} {t.num_layers}L d={t.hidden_size} heads={t.num_heads}/{t.num_kv_heads}"
               + (f" experts={t.moe.num_experts} top{t.moe.top_k}" if t.moe else ""),
        "vision": f"InternViT {cfg.vision.num_layers}L d={cfg.vision.hidden_size} {cfg.vision.norm_type}",
        "params": f"{total / 1e6:,.2f}M", **{f"params.{k}": f"{v / 1e6:,.2f}M" for k, v in sorted(counts.items())},
        "dtype": ", ".join(f"{k} ({v / total:.0%})" for k, v in dtypes.most_common()),
        "flash": "no" if cfg.flash is None else f"yes (flash_mode={cfg.flash.flash_mode})",
        "tokens/tile": cfg.num_image_token, "files": len(files),
        "disk": f"{sum(f.stat().st_size for f in files) / 2**20:,.1f} MiB",
    }
