"""Dense per-patch labels of the vision warm-up: right place, right class, same tiles as training."""

import random

import torch

from internvl35.data.image import preprocess_image
from internvl35.data.world import generate
from internvl35.data.world.dense import CHARSET, COLOR_IDS, HEADS, SHAPE_IDS, tile_targets
from internvl35.data.world.render import Style, annotate, canvas, draw_shape, draw_text

COLOR, SHAPE, CENTERS, LEFT, RIGHT = range(len(HEADS))


def test_a_shape_is_labelled_where_it_is_drawn():
    with annotate() as ann:
        img = canvas(112, 112, random.Random(0), Style())
        draw_shape(img, "square", "red", (56, 28, 84, 56), random.Random(0), Style())  # patches x 4-5, y 2-3
    t = tile_targets(ann.marks(img), 112, 112, 112, 14, max_num=6)
    assert t.shape == (1, 64, len(HEADS))
    grid = t[0].view(8, 8, -1)
    covered = torch.zeros(8, 8, dtype=torch.bool)
    covered[2:4, 4:6] = True
    assert (grid[..., COLOR][covered] == COLOR_IDS["red"]).all() and (grid[..., COLOR][~covered] == 0).all()
    assert (grid[..., SHAPE][covered] == SHAPE_IDS["square"]).all()
    assert grid[..., CENTERS].sum() == 1 and grid[4, 5, CENTERS] == 0  # centre (70, 42) -> patch (3, 5)
    assert grid[3, 5, CENTERS] == 1


def test_characters_are_labelled_left_to_right():
    with annotate() as ann:
        img = canvas(112, 112, random.Random(0), Style())
        draw_text(img, "cat", (20, 50), 20, "DejaVuSansMono.ttf")
    t = tile_targets(ann.marks(img), 112, 112, 112, 14, max_num=6)[0]
    labelled = [(i, slot, int(t[i, slot])) for i in range(64) for slot in (LEFT, RIGHT) if t[i, slot]]
    order = sorted(labelled, key=lambda x: (x[0] % 8, x[1]))
    assert "".join(CHARSET[k - 1] for _, _, k in order) == "cat"
    assert t[:, COLOR].sum() == 0  # text is not an object


def test_labels_follow_the_tiles_training_cuts():
    for family, seed in (("hires", 1), ("multi_image", 2), ("charts", 3)):
        with annotate() as ann:
            s = generate(family, seed)
        for im in s.images:
            tiles = preprocess_image(im, 112, 6)
            t = tile_targets(ann.marks(im), *im.size, 112, 14, max_num=6)
            assert t.shape[0] == tiles.shape[0] and t.shape[1] == 64
    # the hires word is labelled in the full-resolution tiles, not in the thumbnail (too small there)
    with annotate() as ann:
        s = generate("hires", 1)
    t = tile_targets(ann.marks(s.images[0]), *s.images[0].size, 112, 14, max_num=6)
    assert (t[:-1, :, LEFT:].sum() > 0) and t[-1, :, LEFT:].sum() == 0


def test_annotations_do_not_change_the_images():
    plain = generate("counting", 5)
    with annotate():
        recorded = generate("counting", 5)
    assert plain.images[0].tobytes() == recorded.images[0].tobytes()
