import torch

from internvl35.models.projector import flash_compress_decision, pixel_shuffle


def _grid(g: int = 32) -> torch.Tensor:
    """x(i, j) = (i, j) as a 2-channel token on a g x g grid -> [1, g*g, 2]."""
    i, j = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return torch.stack([i, j], -1).reshape(1, g * g, 2).float()


def test_pixel_shuffle_half_gathers_2x2_neighbourhood_row_major():
    out = pixel_shuffle(_grid(), 0.5)  # [1, 256, 8]
    assert out.shape == (1, 256, 8)
    token = out[0, 16 * 1 + 2].reshape(4, 2).tolist()  # token (1, 2)
    assert token == [[2, 4], [2, 5], [3, 4], [3, 5]]


def test_pixel_shuffle_quarter_gathers_4x4_block():
    out = pixel_shuffle(_grid(), 0.25)  # [1, 64, 32]
    assert out.shape == (1, 64, 32)
    token = out[0, 8 * 1 + 2].reshape(16, 2).tolist()
    assert token == [[r, c] for r in range(4, 8) for c in range(8, 12)]


def test_flash_decision_single_tile_never_compressed():
    assert flash_compress_decision(torch.tensor([0.99]), 0.0, 0.0).tolist() == [False]


def test_flash_decision_relative_and_absolute():
    p = torch.tensor([0.1, 0.9, 0.6, 0.95])
    # 50% quantile = 0.75: tiles strictly above it and >= absolute 0.5
    assert flash_compress_decision(p, 0.5, 0.5).tolist() == [False, True, False, True]
    assert flash_compress_decision(p, 0.5, 0.92).tolist() == [False, False, False, True]
    assert flash_compress_decision(p, 0.0, 0.0).tolist() == [False, True, True, True]
