"""Tiny random `InternVLForConditionalGeneration` checkpoints written by transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from internvl35.data.tokenizer import Tokenizer
from tests.conftest import randomize_

IMAGE_SIZE, PATCH = 112, 14  # 8x8 patches -> 16 tokens per tile (4 with Flash)


def text_config(kind: str, vocab: int, tie: bool = False) -> dict:
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    if kind == "qwen3_moe":
        base.update(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                    norm_topk_prob=True)
    else:
        base.update(model_type="qwen3")
    return base


def vision_config(kind: str) -> dict:
    six_b = kind == "6b"
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=[IMAGE_SIZE] * 2, patch_size=[PATCH] * 2, norm_type="rms_norm" if six_b else "layer_norm",
                use_qk_norm=six_b, attention_bias=not six_b, layer_norm_eps=1e-6, use_mean_pooling=True)


def make_hf_model(tokenizer: Tokenizer, text: str = "qwen3", vision: str = "300m", seed: int = 0,
                  tie: bool = False):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(vision_config=vision_config(vision),
                         text_config=text_config(text, tokenizer.vocab_size, tie),
                         image_token_id=tokenizer.img_context_id, image_seq_length=(IMAGE_SIZE // PATCH // 2) ** 2,
                         downsample_ratio=0.5, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    randomize_(model, seed)
    return model


def save_hf(model, tokenizer: Tokenizer, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save(out)
    return out
