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
def tokenizer() -> Tokenizer:
    return train_bpe(CORPUS * 4, vocab_size=400)


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
