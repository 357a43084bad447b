"""Model configuration: the one source of truth for every dimension.

Frozen dataclasses describe the weights of a checkpoint (vision tower, LLM, projector, Flash router);
`CONFIGS` holds a named preset per released size plus the tiny `mini*` presets. Dims follow the released
`config.json` files (see the size table in the architecture notes). Runtime knobs (engine, training)
live in their own packages; this module describes weights only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from internvl35.errors import UnsupportedArchitectureError


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """InternViT: 300M (layer_norm, qkv bias) and 6B (rms_norm, qk-norm) share one definition."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    qk_norm: bool = False
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1  # only used to initialise fresh weights
    drop_path_rate: float = 0.0  # training only

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Sparse MLP: Qwen3-MoE (softmax then top-k) or GPT-OSS (top-k then softmax)."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """The LLM: Qwen3 dense, Qwen3-MoE or GPT-OSS (selected by `arch`)."""

    arch: Literal["qwen3", "qwen3_moe", "gpt_oss"] = "qwen3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 128
    intermediate_size: int
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_embeddings: bool = False
    moe: MoEConfig | None = None
    attention_bias: bool = False
    sliding_window: int | None = None
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)


@dataclass(frozen=True, kw_only=True)
class FlashConfig:
    """InternVL3.5-Flash: mlp2 (64 tokens/tile) + Visual Resolution Router. Thresholds are defaults;
    every call may override them."""

    flash_mode: bool = False
    relative_threshold: float = 0.5
    absolute_threshold: float = 0.5


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str
    vision: VisionConfig
    text: TextConfig
    downsample_ratio: float = 0.5
    select_layer: int = -1
    ps_version: str = "v2"
    template: str = "internvl2_5"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    flash: FlashConfig | None = None  # present => mlp2 + router weights exist
    system_message: str | None = None  # replaces the template's default system message when set

    @property
    def num_image_token(self) -> int:
        return int(self.vision.grid**2 * self.downsample_ratio**2)

    @property
    def num_flash_token(self) -> int:
        return int(self.vision.grid**2 * (self.downsample_ratio / 2) ** 2)


# --- presets -------------------------------------------------------------------------------------

VIT_300M = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
VIT_6B = VisionConfig(
    hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
    norm_type="rms_norm", qk_norm=True, qkv_bias=False,
)


def _qwen3(d: int, layers: int, heads: int, kv: int, ffn: int) -> TextConfig:
    return TextConfig(hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=ffn)


def _qwen3_moe(d: int, layers: int, heads: int, kv: int, experts: int, ffn: int, top_k: int) -> TextConfig:
    moe = MoEConfig(num_experts=experts, top_k=top_k, expert_intermediate_size=ffn)
    return TextConfig(arch="qwen3_moe", hidden_size=d, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, intermediate_size=ffn * top_k, moe=moe)


GPT_OSS_20B = TextConfig(
    arch="gpt_oss", hidden_size=2880, num_layers=24, num_heads=64, num_kv_heads=8, head_dim=64,
    intermediate_size=2880, vocab_size=201088, rope_theta=150000.0, rms_norm_eps=1e-5,
    max_position_embeddings=131072, attention_bias=True, sliding_window=128,
    moe=MoEConfig(num_experts=32, top_k=4, expert_intermediate_size=2880, norm_topk_prob=False),
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 32.0, "beta_slow": 1.0},
)

# The tiny presets: same code paths as the released sizes, small enough for CPU tests and training.
MINI_VIT = VisionConfig(hidden_size=192, num_layers=6, num_heads=3, intermediate_size=768,
                        image_size=112, patch_size=14)
MINI_TEXT = TextConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                       intermediate_size=768, vocab_size=1024, tie_embeddings=True,
                       max_position_embeddings=4096)

CONFIGS: dict[str, ModelConfig] = {
    "1B": ModelConfig(name="InternVL3.5-1B", vision=VIT_300M, text=_qwen3(1024, 28, 16, 8, 3072)),
    "2B": ModelConfig(name="InternVL3.5-2B", vision=VIT_300M, text=_qwen3(2048, 28, 16, 8, 6144)),
    "4B": ModelConfig(name="InternVL3.5-4B", vision=VIT_300M, text=_qwen3(2560, 36, 32, 8, 9728)),
    "8B": ModelConfig(name="InternVL3.5-8B", vision=VIT_300M, text=_qwen3(4096, 36, 32, 8, 12288)),
    "14B": ModelConfig(name="InternVL3.5-14B", vision=VIT_300M, text=_qwen3(5120, 40, 40, 8, 17408)),
    "38B": ModelConfig(name="InternVL3.5-38B", vision=VIT_6B, text=_qwen3(5120, 64, 64, 8, 25600)),
    "30B-A3B": ModelConfig(name="InternVL3.5-30B-A3B", vision=VIT_300M,
                           text=_qwen3_moe(2048, 48, 32, 4, 128, 768, 8)),
    "241B-A28B": ModelConfig(name="InternVL3.5-241B-A28B", vision=VIT_6B,
                             text=_qwen3_moe(4096, 94, 64, 4, 128, 1536, 8)),
    "20B-A4B": ModelConfig(name="InternVL3.5-GPT-OSS-20B-A4B", vision=VIT_300M, text=GPT_OSS_20B,
                           template="internvl3_5_gpt_oss"),
    # A short system message: the template's default one is ~140 byte-level tokens for a small BPE.
    "mini": ModelConfig(name="InternVL3.5-mini", vision=MINI_VIT, text=MINI_TEXT, flash=FlashConfig(),
                        max_dynamic_patch=6, system_message="You are a helpful assistant."),
}
CONFIGS["mini-moe"] = dataclasses.replace(
    CONFIGS["mini"], name="InternVL3.5-mini-moe", flash=None,
    text=dataclasses.replace(MINI_TEXT, arch="qwen3_moe", intermediate_size=256,
                             moe=MoEConfig(num_experts=8, top_k=2, expert_intermediate_size=128)))
CONFIGS["mini-6b"] = dataclasses.replace(
    CONFIGS["mini"], name="InternVL3.5-mini-6b", flash=None,
    vision=dataclasses.replace(MINI_VIT, norm_type="rms_norm", qk_norm=True, qkv_bias=False))
for _size in ("1B", "2B", "4B", "8B", "14B", "38B", "30B-A3B"):
    CONFIGS[f"{_size}-Flash"] = dataclasses.replace(
        CONFIGS[_size], name=CONFIGS[_size].name + "-Flash", flash=FlashConfig(flash_mode=True))


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields replaced: whole sections (`text=TextConfig(...)`) or,
    given as dicts, single fields of a section (`vision={"image_size": 224}`)."""
    if name not in CONFIGS:
        raise UnsupportedArchitectureError(f"unknown preset {name!r}; known: {', '.join(CONFIGS)}")
    return _replace(CONFIGS[name], overrides)


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    return dataclasses.replace(obj, **{k: _replace(getattr(obj, k), v) if isinstance(v, dict) else v
                                       for k, v in changes.items()})
