import pytest
from PIL import Image

from internvl35 import dynamic_preprocess
from internvl35.data.image import closest_grid, load_image, num_tiles, target_grids, tiles_to_tensor
from internvl35.errors import InputError


def test_candidate_grids():
    grids = target_grids(1, 12)
    assert len(grids) == 35
    assert [g[0] * g[1] for g in grids] == sorted(g[0] * g[1] for g in grids)


@pytest.mark.parametrize("size,tiles", [((448, 448), 1), ((500, 500), 1), ((1000, 1000), 10), ((800, 600), 13),
                                        ((640, 480), 13), ((1920, 1080), 9), ((3000, 200), 13)])
def test_tiling_table(size, tiles):
    assert len(dynamic_preprocess(Image.new("RGB", size), max_num=12, image_size=448)) == tiles


def test_1920x1080_is_4x2_and_tie_rule():
    assert closest_grid(1920, 1080, target_grids(1, 12), 448) == (4, 2)
    # 1:1 ties between 1x1, 2x2, 3x3: larger grid only if the image covers > half of it
    assert closest_grid(500, 500, target_grids(1, 12), 448) == (1, 1)
    assert closest_grid(1000, 1000, target_grids(1, 12), 448) == (3, 3)


def test_tiles_are_row_major_and_thumbnail_last():
    img = Image.new("RGB", (896, 448))
    img.paste((255, 0, 0), (448, 0, 896, 448))  # right half red
    tiles = dynamic_preprocess(img, max_num=12, image_size=448)
    assert len(tiles) == 3
    assert tiles[0].getpixel((10, 10)) == (0, 0, 0) and tiles[1].getpixel((10, 10)) == (255, 0, 0)
    assert tiles[2].size == (448, 448) and tiles[2].getpixel((400, 10))[0] > 200


def test_normalisation():
    x = tiles_to_tensor([Image.new("RGB", (448, 448), (255, 255, 255))], 448)
    assert x.shape == (1, 3, 448, 448)
    assert abs(x[0, 0, 0, 0].item() - (1 - 0.485) / 0.229) < 1e-5


def test_normalisation_equals_the_formula_per_channel_and_tile():
    """(pixel / 255 - mean) / std, exactly, channel by channel and tile by tile, in contiguous
    NCHW; a tile of another size is resized, an RGBA one converted."""
    import numpy as np
    import torch

    from internvl35.data.image import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(3)]
    tiles = [Image.fromarray(a) for a in arrays] + [Image.fromarray(arrays[0]).convert("RGBA"),
                                                      Image.fromarray(arrays[1]).resize((56, 56))]
    x = tiles_to_tensor(tiles, 28)
    assert x.shape == (5, 3, 28, 28) and x.is_contiguous()
    want = [np.asarray(t.convert("RGB").resize((28, 28), Image.BICUBIC) if t.size != (28, 28) else t.convert("RGB"))
            for t in tiles]
    for i, a in enumerate(want):
        for c in range(3):
            ref = (torch.from_numpy(a[:, :, c].astype(np.float32)) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            torch.testing.assert_close(x[i, c], ref, atol=0, rtol=0)


def test_bad_images(tmp_path):
    with pytest.raises(InputError, match="cannot decode"):
        load_image(b"not an image")
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="above the limit"):
        load_image(tmp_path / "big.png", max_pixels=5000)
    data = (tmp_path / "big.png").read_bytes()
    with pytest.raises(InputError):
        load_image(data[: len(data) // 2])


def test_tile_count_without_decoding_matches_the_tiler():
    import random

    rng = random.Random(0)
    for _ in range(60):
        w, h, n = rng.randint(20, 3000), rng.randint(20, 3000), rng.randint(1, 12)
        thumb = rng.random() < 0.8
        tiles = dynamic_preprocess(Image.new("RGB", (w, h)), 1, n, 28, thumb)
        assert num_tiles(w, h, 28, n, thumb) == len(tiles), (w, h, n, thumb)
