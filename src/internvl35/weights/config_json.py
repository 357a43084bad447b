"""Read and write `config.json` in both released formats (custom `InternVLChatModel` and `-HF`
`InternVLForConditionalGeneration`) and detect which one a directory holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from internvl35.config import FlashConfig, ModelConfig, MoEConfig, TextConfig, VisionConfig
from internvl35.errors import CheckpointError, UnsupportedArchitectureError

_TEXT_ARCH = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


def read_config_json(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json (not a checkpoint directory)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON ({e})") from None


def detect_format(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if raw.get("model_type") == "internvl_chat" or "InternVLChatModel" in archs:
        return "custom"
    if raw.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in archs:
        return "hf"
    raise UnsupportedArchitectureError(
        f"unknown architecture (model_type={raw.get('model_type')!r}, architectures={archs}); expected "
        "an InternVL3.5 checkpoint (InternVLChatModel or InternVLForConditionalGeneration)")


def _text_from_dict(d: dict[str, Any]) -> TextConfig:
    arch = d.get("model_type")
    if arch not in _TEXT_ARCH:
        raise UnsupportedArchitectureError(f"unsupported LLM model_type {arch!r}; known: {', '.join(_TEXT_ARCH)}")
    rope = d.get("rope_parameters") or {}
    theta = d.get("rope_theta") or rope.get("rope_theta") or 1e6
    moe = None
    n_exp = d.get("num_experts") or d.get("num_local_experts")
    if arch != "qwen3" and n_exp:
        moe = MoEConfig(num_experts=n_exp, top_k=d.get("num_experts_per_tok") or d.get("experts_per_token"),
                        expert_intermediate_size=d.get("moe_intermediate_size") or d["intermediate_size"],
                        norm_topk_prob=d.get("norm_topk_prob", arch == "qwen3_moe"),
                        router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return TextConfig(
        arch=arch, hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], num_kv_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"], rope_theta=float(theta),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6), max_position_embeddings=d.get("max_position_embeddings", 40960),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), moe=moe,
        attention_bias=bool(d.get("attention_bias", False)), sliding_window=d.get("sliding_window"),
        rope_scaling=scaling)


def _size(v: Any) -> int:
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def _vision_from_dict(d: dict[str, Any], hf: bool) -> VisionConfig:
    return VisionConfig(
        hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], image_size=_size(d.get("image_size", 448)),
        patch_size=_size(d.get("patch_size", 14)), norm_type=d.get("norm_type", "layer_norm"),
        qk_norm=bool(d.get("use_qk_norm" if hf else "qk_normalization", False)),
        qkv_bias=bool(d.get("attention_bias" if hf else "qkv_bias", True)),
        layer_norm_eps=d.get("layer_norm_eps", 1e-6),
        layer_scale_init=d.get("layer_scale_init_value" if hf else "initializer_factor", 0.1))


def config_from_dict(raw: dict[str, Any], name: str = "checkpoint") -> tuple[ModelConfig, str]:
    """Parse a config.json dict of either format -> (ModelConfig, "custom" | "hf")."""
    fmt = detect_format(raw)
    try:
        if fmt == "custom":
            vision, text = _vision_from_dict(raw["vision_config"], False), _text_from_dict(raw["llm_config"])
        else:
            vision, text = _vision_from_dict(raw["vision_config"], True), _text_from_dict(raw["text_config"])
    except KeyError as e:
        raise CheckpointError(f"config.json: missing field {e.args[0]!r}") from None
    flash = None
    if "flash_mode" in raw:
        flash = FlashConfig(flash_mode=bool(raw["flash_mode"]),
                            relative_threshold=raw.get("flash_relative_threshold", 0.5),
                            absolute_threshold=raw.get("flash_absolute_threshold", 0.5))
    cfg = ModelConfig(
        name=raw.get("_name_or_path") or name, vision=vision, text=text,
        downsample_ratio=raw.get("downsample_ratio", 0.5),
        select_layer=raw.get("select_layer", raw.get("vision_feature_layer", -1)),
        ps_version=raw.get("ps_version", "v2"), template=raw.get("template", "internvl2_5"),
        dynamic_image_size=raw.get("dynamic_image_size", True), use_thumbnail=raw.get("use_thumbnail", True),
        min_dynamic_patch=raw.get("min_dynamic_patch", 1), max_dynamic_patch=raw.get("max_dynamic_patch", 12),
        flash=flash, system_message=raw.get("system_message"))
    if cfg.ps_version != "v2":
        raise UnsupportedArchitectureError(f"ps_version {cfg.ps_version!r} is not used by InternVL3.5 (v2)")
    return cfg, fmt


def _text_to_dict(t: TextConfig, eos_id: int | None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "architectures": [_TEXT_ARCH[t.arch]], "model_type": t.arch, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps, "hidden_act": "silu",
        "max_position_embeddings": t.max_position_embeddings, "rope_theta": t.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "tie_word_embeddings": t.tie_embeddings, "attention_bias": t.attention_bias, "use_cache": True,
    }
    if eos_id is not None:
        d["eos_token_id"] = eos_id
    if t.moe is not None:
        d.update(num_experts=t.moe.num_experts, num_experts_per_tok=t.moe.top_k,
                 moe_intermediate_size=t.moe.expert_intermediate_size, norm_topk_prob=t.moe.norm_topk_prob,
                 router_aux_loss_coef=t.moe.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[])
    return d


def config_to_dict(cfg: ModelConfig, fmt: str, *, image_token_id: int | None = None,
                   eos_id: int | None = None) -> dict[str, Any]:
    """ModelConfig -> config.json dict in `fmt` ("custom" or "hf")."""
    v = cfg.vision
    text = _text_to_dict(cfg.text, eos_id)
    if fmt == "custom":
        out: dict[str, Any] = {
            "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "vision_config": {
                "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
                "image_size": v.image_size, "patch_size": v.patch_size, "norm_type": v.norm_type,
                "qk_normalization": v.qk_norm, "qkv_bias": v.qkv_bias, "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "gelu", "initializer_factor": v.layer_scale_init, "use_flash_attn": False},
            "llm_config": text, "select_layer": cfg.select_layer, "force_image_size": v.image_size,
            "downsample_ratio": cfg.downsample_ratio, "template": cfg.template, "ps_version": cfg.ps_version,
            "dynamic_image_size": cfg.dynamic_image_size, "use_thumbnail": cfg.use_thumbnail,
            "min_dynamic_patch": cfg.min_dynamic_patch, "max_dynamic_patch": cfg.max_dynamic_patch,
            "use_backbone_lora": 0, "use_llm_lora": 0, "tie_word_embeddings": cfg.text.tie_embeddings,
        }
    else:
        out = {
            "architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
            "vision_config": {
                "model_type": "internvl_vision", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
                "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_norm, "norm_type": v.norm_type,
                "layer_norm_eps": v.layer_norm_eps, "image_size": [v.image_size] * 2,
                "patch_size": [v.patch_size] * 2, "use_absolute_position_embeddings": True,
                "use_mean_pooling": True, "use_mask_token": False, "layer_scale_init_value": v.layer_scale_init,
                "projection_dropout": 0.0, "hidden_dropout_prob": 0.0, "hidden_act": "gelu"},
            "text_config": text, "downsample_ratio": cfg.downsample_ratio,
            "image_seq_length": cfg.num_image_token, "image_token_id": image_token_id,
            "projector_hidden_act": "gelu", "vision_feature_layer": cfg.select_layer,
            "vision_feature_select_strategy": "default", "tie_word_embeddings": cfg.text.tie_embeddings,
            # InternVL preprocessing facts that HF keeps in the processor; kept here for round trips.
            "template": cfg.template, "dynamic_image_size": cfg.dynamic_image_size,
            "use_thumbnail": cfg.use_thumbnail, "min_dynamic_patch": cfg.min_dynamic_patch,
            "max_dynamic_patch": cfg.max_dynamic_patch,
        }
    if cfg.system_message is not None:
        out["system_message"] = cfg.system_message
    if cfg.flash is not None:
        out.update(flash_mode=cfg.flash.flash_mode, flash_relative_threshold=cfg.flash.relative_threshold,
                   flash_absolute_threshold=cfg.flash.absolute_threshold)
    return out
