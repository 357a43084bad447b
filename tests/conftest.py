"""Shared fixtures: a small BPE tokenizer with every InternVL token, and tiny random checkpoints
written by transformers (HF format) or by this package (custom format)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from internvl35.data.tokenizer import Tokenizer, train_bpe

CORPUS = [
    "What color is the circle? The circle is red.", "How many squares are there? 3",
    "Describe the image. A blue star above a green triangle.", "Is the red circle to the left of the blue square? Yes",
    "Please provide the bounding box coordinate of the region this sentence describes.",
    "The quick brown fox jumps over the lazy dog 0123456789.", "Image-1: Image-2: Frame1: Frame2:",
]


@pytest.fixture(scope="session")
def mini():
    """The embedded mini model (loaded once for the whole run)."""
    import internvl35

    return internvl35.load("mini")


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_bpe(CORPUS * 4, vocab_size=400)


@pytest.fixture()
def tok_dir(tmp_path, tokenizer):
    """The tokenizer saved as a directory (what training configs name)."""
    d = tmp_path / "tok"
    d.mkdir()
    tokenizer.save(d)
    return d


@pytest.fixture()
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (150, 260, 3), dtype=np.uint8))


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every parameter with a scale that makes outputs sensitive to every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim == 1 and ("norm" in name or "ls" in name or "lambda" in name or "layer_norm" in name):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(noise / fan_in**0.5)


def tiny_config(vocab: int, **overrides):
    """The `mini` preset shrunk further for unit tests (keeps every flag of the preset)."""
    import dataclasses

    from internvl35.config import get_config

    base = get_config("mini")
    vision = dataclasses.replace(base.vision, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                 image_size=112)
    text = dataclasses.replace(base.text, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                               intermediate_size=128, vocab_size=vocab)
    return dataclasses.replace(base, vision=vision, text=text, **overrides)


def write_tiny(path, tokenizer, cfg=None, fmt: str = "custom", seed: int = 0):
    """A random tiny checkpoint written by this package; returns its directory."""
    from internvl35.models.internvl import InternVLModel
    from internvl35.weights.convert import write_checkpoint

    cfg = cfg or tiny_config(tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = InternVLModel(cfg)
    randomize_(model, seed)
    write_checkpoint(model, tokenizer, path, fmt, torch.float32)
    return path


@pytest.fixture()
def tiny_ckpt(tmp_path, tokenizer):
    return write_tiny(tmp_path / "tiny", tokenizer)
