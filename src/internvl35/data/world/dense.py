"""Dense per-patch targets for the vision warm-up: what each ViT patch of each tile shows.

A from-scratch ViT learns slowly through the language loss alone (one answer token per image). The
world knows what it drew, so every patch of every tile gets labels: the colour and shape covering it,
how many object centres fall in it, and which characters are centred in its left and right half.
Tiles are cut exactly as training cuts them (`closest_grid` + thumbnail, one tile per video frame).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from internvl35.data.image import closest_grid, target_grids
from internvl35.data.world.render import COLORS, SHAPES, Mark, _draw, font

CHARSET = "abcdefghijklmnopqrstuvwxyz0123456789ABCDE+-"
COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}  # 0: background
SHAPE_IDS = {**{s: i + 1 for i, s in enumerate(SHAPES)}, "bar": len(SHAPES) + 1}
# label name -> number of classes; the order is the last axis of the target tensor
HEADS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 2, "centers": 3,
         "char_left": len(CHARSET) + 1, "char_right": len(CHARSET) + 1}
MIN_COVER = 0.08  # share of a patch an object must cover to label it
MIN_GLYPH = 9  # px: characters drawn smaller than this in a tile (e.g. in a thumbnail) get no label


def tile_views(w: int, h: int, image_size: int, max_num: int, use_thumbnail: bool
               ) -> list[tuple[float, float, float, float]]:
    """(scale x, scale y, offset x, offset y) mapping image pixels to each tile's pixels, in tile order."""
    cols, rows = closest_grid(w, h, target_grids(1, max_num), image_size)
    sx, sy = image_size * cols / w, image_size * rows / h
    views = [(sx, sy, c * image_size, r * image_size) for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(views) != 1:
        views.append((image_size / w, image_size / h, 0.0, 0.0))
    return views


def _char_centres(m: Mark) -> list[tuple[float, float, int, int]]:
    """(x, y, class, font size) of each labelled character of a text mark."""
    f = font(m.font, m.size)
    x, y = m.box[0], m.box[1]
    _, top, _, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((x, y), m.text, font=f)
    return [(x + f.getlength(m.text[:i]) + f.getlength(ch) / 2, (top + bottom) / 2, CHARSET.index(ch) + 1,
             m.size) for i, ch in enumerate(m.text) if ch in CHARSET]


def _majority(label: np.ndarray, patch: int, classes: int) -> np.ndarray:
    """[S, S] class map -> [g*g] per-patch class covering the most pixels (0 when under MIN_COVER)."""
    g = label.shape[0] // patch
    patches = label.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    counts = np.stack([(patches == k).sum(1) for k in range(1, classes)], 1)
    best = counts.argmax(1)
    return np.where(counts.max(1) >= MIN_COVER * patch * patch, best + 1, 0)


def tile_targets(marks: list[Mark], w: int, h: int, image_size: int, patch: int, max_num: int,
                 use_thumbnail: bool = True) -> torch.Tensor:
    """Targets [T, g*g, len(HEADS)] (long) for the tiles of a w x h image drawn with `marks`."""
    g = image_size // patch
    out = []
    chars = [c for m in marks if m.kind == "text" for c in _char_centres(m)]
    centres = [((m.box[0] + m.box[2]) / 2, (m.box[1] + m.box[3]) / 2) for m in marks if m.kind == "shape"]
    for sx, sy, ox, oy in tile_views(w, h, image_size, max_num, use_thumbnail):
        color = Image.new("L", (image_size, image_size), 0)
        shape = Image.new("L", (image_size, image_size), 0)
        for m in marks:
            if m.kind == "text":
                continue
            box = (m.box[0] * sx - ox, m.box[1] * sy - oy, m.box[2] * sx - ox, m.box[3] * sy - oy)
            kind = "square" if m.kind == "bar" else m.shape
            _draw(ImageDraw.Draw(color), kind, box, COLOR_IDS[m.color])
            _draw(ImageDraw.Draw(shape), kind, box, SHAPE_IDS[m.shape or "bar"])
        t = np.zeros((g * g, len(HEADS)), dtype=np.int64)
        t[:, 0] = _majority(np.asarray(color), patch, HEADS["color"])
        t[:, 1] = _majority(np.asarray(shape), patch, HEADS["shape"])
        for x, y in centres:
            px, py = x * sx - ox, y * sy - oy
            if 0 <= px < image_size and 0 <= py < image_size:
                i = int(py // patch) * g + int(px // patch)
                t[i, 2] = min(t[i, 2] + 1, 2)
        for x, y, k, size in chars:
            px, py = x * sx - ox, y * sy - oy
            if 0 <= px < image_size and 0 <= py < image_size and size * min(sx, sy) >= MIN_GLYPH:
                i = int(py // patch) * g + int(px // patch)
                t[i, 3 if (px % patch) < patch / 2 else 4] = k
        out.append(torch.from_numpy(t))
    return torch.stack(out)
