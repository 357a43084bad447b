"""The one table of checkpoint key names.

Internal parameter names are the custom (GitHub) checkpoint names, except that Qwen3-MoE experts
are stacked into `mlp.experts.gate_up_proj` [E, 2I, D] / `mlp.experts.down_proj` [E, D, I].
`HF_TO_CUSTOM` maps the `-HF` (transformers) names; it is inverted for export. A checkpoint key
resolves to a `Target`: which parameter, which expert row, and which of `nparts` equal chunks
along dim 0 (q/k/v thirds, gate/up halves).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    param: str
    expert: int | None = None
    part: int = 0
    nparts: int = 1


_V = "model.vision_tower.encoder.layer.{}."
_C = "vision_model.encoder.layers.{}."
# (custom template, hf template, part, nparts); "{}" is a layer index.
HF_TO_CUSTOM: list[tuple[str, str, int, int]] = [
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token", 0, 1),
    ("vision_model.embeddings.patch_embedding.weight",
     "model.vision_tower.embeddings.patch_embeddings.projection.weight", 0, 1),
    ("vision_model.embeddings.patch_embedding.bias",
     "model.vision_tower.embeddings.patch_embeddings.projection.bias", 0, 1),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings", 0, 1),
    *[(_C + f"attn.qkv.{w}", _V + f"attention.{p}_proj.{w}", i, 3)
      for w in ("weight", "bias") for i, p in enumerate("qkv")],
    *[(_C + f"attn.proj.{w}", _V + f"attention.projection_layer.{w}", 0, 1) for w in ("weight", "bias")],
    (_C + "attn.q_norm.weight", _V + "attention.q_norm.weight", 0, 1),
    (_C + "attn.k_norm.weight", _V + "attention.k_norm.weight", 0, 1),
    *[(_C + f"{c}.{w}", _V + f"{h}.{w}", 0, 1) for c, h in
      (("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("mlp.fc1", "mlp.fc1"),
       ("mlp.fc2", "mlp.fc2")) for w in ("weight", "bias")],
    (_C + "ls1", _V + "lambda_1", 0, 1),
    (_C + "ls2", _V + "lambda_2", 0, 1),
    *[(f"mlp1.{i}.{w}", f"model.multi_modal_projector.{h}.{w}", 0, 1)
      for i, h in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")) for w in ("weight", "bias")],
]
# Prefix rules applied after the table (whole subtrees that only move).
HF_PREFIXES: list[tuple[str, str]] = [("language_model.model.", "model.language_model."),
                                      ("language_model.lm_head.", "lm_head.")]
# transformers-4.52 on-disk layout -> current in-memory HF names.
HF_LEGACY_PREFIXES: list[tuple[str, str]] = [
    ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head.")]

_EXPERT = re.compile(r"^(language_model\.model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def _regex(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{\}", r"(\d+)") + "$")


_FROM_HF = [(_regex(h), c, part, n) for c, h, part, n in HF_TO_CUSTOM]
_TO_HF: dict[str, list[tuple[str, int, int]]] = {}
for _c, _h, _part, _n in HF_TO_CUSTOM:
    _TO_HF.setdefault(_c, []).append((_h, _part, _n))
_TO_HF_RE = [(_regex(c), c) for c in _TO_HF]


def _swap_prefix(key: str, rules: list[tuple[str, str]], reverse: bool = False) -> str | None:
    for a, b in rules:
        src, dst = (b, a) if reverse else (a, b)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def custom_to_internal(key: str, part: int = 0, nparts: int = 1) -> Target:
    m = _EXPERT.match(key)
    if m is None:
        return Target(key, None, part, nparts)
    prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
    if proj == "down":
        return Target(f"{prefix}.down_proj", expert)
    return Target(f"{prefix}.gate_up_proj", expert, 0 if proj == "gate" else 1, 2)


def hf_to_custom(key: str) -> tuple[str, int, int]:
    """An HF key (in-memory or legacy on-disk) -> (custom key, part, nparts)."""
    if not key.startswith(("model.", "lm_head.")):
        key = _swap_prefix(key, HF_LEGACY_PREFIXES) or key
    for pattern, custom, part, n in _FROM_HF:
        m = pattern.match(key)
        if m:
            return custom.replace("{}", m.group(1), 1) if m.groups() else custom, part, n
    moved = _swap_prefix(key, HF_PREFIXES, reverse=True)
    return (moved or key), 0, 1  # Flash modules and unknown keys keep their names


def resolve(key: str, fmt: str) -> Target:
    """Checkpoint key in format `fmt` ("custom" or "hf") -> internal parameter target."""
    if fmt == "hf":
        custom, part, n = hf_to_custom(key)
        return custom_to_internal(custom, part, n)
    return custom_to_internal(key)


def custom_to_hf(key: str) -> list[tuple[str, int, int]]:
    """A custom key -> [(hf key, part, nparts)] (three entries for a packed qkv)."""
    for pattern, custom in _TO_HF_RE:
        m = pattern.match(key)
        if m:
            idx = m.group(1) if m.groups() else ""
            return [(h.replace("{}", idx, 1), part, n) for h, part, n in _TO_HF[custom]]
    moved = _swap_prefix(key, HF_PREFIXES)
    return [(moved or key, 0, 1)]


def internal_to_custom(name: str, num_experts: int) -> list[tuple[str, int | None, int, int]]:
    """An internal parameter -> [(custom key, expert, part, nparts)] (one per expert slice)."""
    if name.endswith(".mlp.experts.gate_up_proj"):
        base = name[: -len(".gate_up_proj")]
        return [(f"{base}.{e}.{p}_proj.weight", e, i, 2) for e in range(num_experts)
                for i, p in enumerate(("gate", "up"))]
    if name.endswith(".mlp.experts.down_proj"):
        base = name[: -len(".down_proj")]
        return [(f"{base}.{e}.down_proj.weight", e, 0, 1) for e in range(num_experts)]
    return [(name, None, 0, 1)]
