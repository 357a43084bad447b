"""Qwen3 decoder (dense or MoE), the LLM of every Qwen3-based InternVL3.5 size.

GQA attention with per-head q/k RMSNorm before RoPE, SwiGLU MLP or `Qwen3MoE`, pre-norm blocks.
Names match `language_model.*` in the checkpoints. Attention either runs causally over the given
tokens or through an `AttentionCache` (static cache for `generate`, paged cache for the engine).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.config import TextConfig
from internvl35.models.layers import (AttentionCache, Bf16Weight, Embedding, FusedLinears, Linear, PackedWeight,
                                      RMSNorm, apply_rope, attention, linear, rope_cos_sin)
from internvl35.models.moe import Qwen3MoE


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.H, self.K, self.Dh = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = Linear(D, self.H * self.Dh, bias=cfg.attention_bias)
        self.k_proj = Linear(D, self.K * self.Dh, bias=cfg.attention_bias)
        self.v_proj = Linear(D, self.K * self.Dh, bias=cfg.attention_bias)
        self.o_proj = Linear(self.H * self.Dh, D, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.Dh, cfg.rms_norm_eps)
        self.qkv: FusedLinears | None = None  # set by `fuse_projections_` (inference)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: AttentionCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = self.q_norm(q.view(B, L, self.H, self.Dh)).transpose(1, 2)  # [B, H, L, Dh]
        k = self.k_norm(k.view(B, L, self.K, self.Dh)).transpose(1, 2)  # [B, K, L, Dh]
        v = v.reshape(B, L, self.K, self.Dh).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            out = cache.attend(self.layer, q, k, v)
        else:
            out = attention(q, k, v, causal=True, mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.H * self.Dh))


class Qwen3MLP(nn.Module):
    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter, bias=False)
        self.up_proj = Linear(dim, inter, bias=False)
        self.down_proj = Linear(inter, dim, bias=False)
        self.gate_up: FusedLinears | None = None  # set by `fuse_projections_` (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MoE(cfg) if cfg.moe else Qwen3MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: AttentionCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: AttentionCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds [B, L, D], positions [B, L] -> final hidden states [B, L, D]."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, cache, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, mask)
        return self.norm(h)


def fuse_projections_(model: nn.Module) -> None:
    """Fuse q/k/v and gate/up of every Qwen3 block in `model` for inference (no extra memory; the
    parameters keep their names and values)."""
    for m in model.modules():
        if any(p.is_meta for p in m.parameters()):
            continue  # not loaded (a decoupled server holds only one side)
        if isinstance(m, Qwen3Attention) and m.qkv is None:
            m.qkv = FusedLinears([m.q_proj, m.k_proj, m.v_proj])
        elif isinstance(m, Qwen3MLP) and m.gate_up is None:
            m.gate_up = FusedLinears([m.gate_proj, m.up_proj])


def _block_products(model: nn.Module) -> Iterator[FusedLinears | Linear]:
    """Every product of the loaded Qwen3 blocks in `model`: fused q|k|v and gate|up where fused, else
    their parts, and o and down."""
    for m in model.modules():
        if any(p.is_meta for p in m.parameters()):
            continue  # not loaded (a decoupled server holds only one side)
        if isinstance(m, Qwen3Attention):
            yield from ([m.qkv] if m.qkv is not None else [m.q_proj, m.k_proj, m.v_proj]) + [m.o_proj]
        elif isinstance(m, Qwen3MLP):
            yield from ([m.gate_up] if m.gate_up is not None else [m.gate_proj, m.up_proj]) + [m.down_proj]


def _causal_lms(model: nn.Module) -> Iterator[Qwen3ForCausalLM]:
    return (m for m in model.modules() if isinstance(m, Qwen3ForCausalLM)
            and not any(p.is_meta for p in m.parameters()))


def pack_weights_(model: nn.Module) -> bool:
    """Give every LLM product a `PackedWeight` copy for decode steps (fp32 CPU models; the copy
    costs the LLM's weight size in memory again). Products already fused pack their fused weight.
    -> whether anything was packed (not for other devices and dtypes)."""
    for f in _block_products(model):
        f.pack()
    packed = False
    for m in _causal_lms(model):
        m.head_packed = PackedWeight.of(m.head_weight)
        packed |= m.head_packed is not None  # the head decides for all: every product shares its device and dtype
    return packed


def bf16_copies_(model: nn.Module) -> bool:
    """Give every LLM product whose weight holds only bfloat16 values a `Bf16Weight` copy, read by
    single-sequence compiled decode steps (CPU; half the LLM's fp32 size in memory). -> whether every
    product got one (False for weights of other dtypes or values, e.g. fine-tuned in fp32)."""
    every = all([f.keep_bf16() for f in _block_products(model)])  # a list: every product, not up to a miss
    for m in _causal_lms(model):
        m.head_half = Bf16Weight.of(m.head_weight)
        every &= m.head_half is not None
    return every


def packed_weights_current(model: nn.Module) -> bool:
    """Whether every packed or bf16 copy still matches its weight (a compiled step uses them unchecked)."""
    return all(f.copies_current() for f in _block_products(model)) and all(
        c is None or c.current(m.head_weight) for m in _causal_lms(model) for c in (m.head_packed, m.head_half))


def fused_projections_intact(model: nn.Module) -> bool:
    """Whether every fused q/k/v and gate/up still reads one buffer (a compiled step assumes it)."""
    return all(f.fused() for m in model.modules() for f in (getattr(m, "qkv", None), getattr(m, "gate_up", None))
               if isinstance(f, FusedLinears))


class Qwen3ForCausalLM(nn.Module):
    """`model` + `lm_head`; with tied embeddings the head reuses `model.embed_tokens.weight`."""

    def __init__(self, cfg: TextConfig, tie_embeddings: bool | None = None) -> None:
        super().__init__()
        if cfg.arch == "gpt_oss":
            from internvl35.errors import UnsupportedArchitectureError
            raise UnsupportedArchitectureError(
                "GPT-OSS (InternVL3.5-20B-A4B) blocks are not supported yet: its config and preset are "
                "known, but attention sinks, sliding windows and its MoE are not implemented")
        self.model = Qwen3Model(cfg)
        self.tied = cfg.tie_embeddings if tie_embeddings is None else tie_embeddings
        self.head_packed: PackedWeight | None = None  # set by `pack_weights_`
        self.head_half: Bf16Weight | None = None  # set by `bf16_copies_`
        if not self.tied:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tied else self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.head_weight, packed=self.head_packed, half=self.head_half)


def require_weights_as_prepared(model: nn.Module) -> None:
    """Raise unless the fused projections and packed copies set up for inference still match the
    parameters: a compiled step reads them unchecked, so its callers check this first."""
    if not (fused_projections_intact(model) and packed_weights_current(model)):
        raise ValueError("compiled decoding needs the fused projections (and packed weights or bf16 copies) as "
                         "prepared at loading")
