"""Drawing primitives of the mini world: noisy backgrounds, coloured shapes, text in bundled fonts.

Two renderers share this module: the training style and an "alt" style (other font, outlined and
anti-aliased shapes, gradient backgrounds) used only to test that answers do not depend on the
generator's own look.

Inside `annotate()`, every drawn shape, bar and text is also recorded per image, so dense per-patch
targets (vision warm-up) can be made for any task's images without the tasks knowing about it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "purple": (140, 40, 180), "orange": (250, 140, 10), "black": (10, 10, 10), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
FONT_DIR = Path(__file__).resolve().parents[2] / "assets" / "fonts"
TRAIN_FONTS = ("default", "DejaVuSansMono.ttf")
ALT_FONTS = ("DejaVuSerif.ttf",)


@dataclass
class Mark:
    """One drawn item: kind "shape" (with `shape`), "bar" (a filled chart bar) or "text" (with `text`,
    `size`, `font`); `box` is (x1, y1, x2, y2) in image pixels (the text's top-left for text)."""

    kind: str
    box: tuple[int, int, int, int]
    color: str | None = None
    shape: str | None = None
    text: str | None = None
    size: int = 0
    font: str = ""


@dataclass
class Annotations:
    _by_image: dict[int, tuple[Image.Image, list[Mark]]] = field(default_factory=dict)

    def add(self, img: Image.Image, mark: Mark) -> None:
        self._by_image.setdefault(id(img), (img, []))[1].append(mark)

    def marks(self, img: Image.Image) -> list[Mark]:
        """What was drawn on `img`, in drawing order (later marks cover earlier ones)."""
        entry = self._by_image.get(id(img))
        return list(entry[1]) if entry is not None and entry[0] is img else []


_recording: ContextVar[Annotations | None] = ContextVar("world_annotations", default=None)


@contextmanager
def annotate() -> Iterator[Annotations]:
    """Record what is drawn (per image) while the block runs."""
    ann = Annotations()
    token = _recording.set(ann)
    try:
        yield ann
    finally:
        _recording.reset(token)


def _record(img: Image.Image, mark: Mark) -> None:
    ann = _recording.get()
    if ann is not None:
        ann.add(img, mark)


@lru_cache(maxsize=64)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "default":  # Pillow's bundled scalable font
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(FONT_DIR / name), size=size)


@dataclass(frozen=True)
class Style:
    """How the renderer looks; `alt` is never seen in training."""

    alt: bool = False
    easy: bool = False  # curriculum: one large object per scene where the task allows it
    big_text: bool = False  # curriculum: reading with large glyphs (about 2 patches per character)

    def font_name(self, rng: random.Random) -> str:
        return rng.choice(ALT_FONTS if self.alt else TRAIN_FONTS)


def jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def canvas(w: int, h: int, rng: random.Random, style: Style) -> Image.Image:
    """A mid-grey background (so black and white objects both stand out) with pixel noise."""
    base = rng.randint(105, 165)
    nrng = np.random.default_rng(rng.getrandbits(32))
    if style.alt:  # horizontal gradient instead of flat grey
        ramp = np.linspace(base - 25, base + 25, w)[None, :, None]
        arr = np.broadcast_to(ramp, (h, w, 3)).copy()
    else:
        arr = np.full((h, w, 3), base, dtype=np.float32)
        arr += np.array([rng.randint(-12, 12) for _ in range(3)], dtype=np.float32)
    arr += nrng.normal(0, rng.uniform(3, 12), size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    raise ValueError(shape)


def draw_shape(img: Image.Image, shape: str, color: str, box: tuple[int, int, int, int],
               rng: random.Random, style: Style) -> None:
    """Draw `shape` filling `box` (x1, y1, x2, y2) in `color`."""
    fill = jitter(COLORS[color], rng)
    _record(img, Mark("shape", tuple(box), color=color, shape=shape))
    x1, y1, x2, y2 = box
    if style.alt:  # supersampled, with a dark outline: a different rasteriser
        s = 4
        layer = Image.new("L", ((x2 - x1) * s, (y2 - y1) * s), 0)
        _draw(ImageDraw.Draw(layer), shape, (0, 0, (x2 - x1) * s - 1, (y2 - y1) * s - 1), 255)
        mask = layer.resize((x2 - x1, y2 - y1), Image.LANCZOS)
        img.paste(Image.new("RGB", mask.size, fill), (x1, y1), mask)
        _draw(ImageDraw.Draw(img), shape, box, None, outline=tuple(c // 3 for c in fill))
        return
    _draw(ImageDraw.Draw(img), shape, box, fill)


def draw_bar(img: Image.Image, box: tuple[int, int, int, int], color: str) -> None:
    """A flat chart bar (no colour jitter: the bars of one chart share one colour)."""
    _record(img, Mark("bar", tuple(box), color=color))
    ImageDraw.Draw(img).rectangle(box, fill=COLORS[color])


def _draw(d: ImageDraw.ImageDraw, shape: str, box, fill, outline=None) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        d.ellipse(box, fill=fill, outline=outline)
    elif shape == "square":
        d.rectangle(box, fill=fill, outline=outline)
    else:
        d.polygon(shape_points(shape, (x1 + x2) / 2, (y1 + y2) / 2 + (x2 - x1) * 0.08 * (shape == "triangle"),
                               (x2 - x1) / 2), fill=fill, outline=outline)


def place_boxes(w: int, h: int, sizes: list[int], rng: random.Random, margin: int = 2,
                overlap: float = 0.1) -> list[tuple[int, int, int, int]] | None:
    """Random square boxes of the given sizes inside (w, h), overlapping at most `overlap` of a side."""
    boxes: list[tuple[int, int, int, int]] = []
    for s in sizes:
        for _ in range(200):
            x, y = rng.randint(margin, w - s - margin), rng.randint(margin, h - s - margin)
            b = (x, y, x + s, y + s)
            if all(_inter(b, o) <= (overlap * min(s, o[2] - o[0])) ** 2 for o in boxes):
                boxes.append(b)
                break
        else:
            return None
    return boxes


def _inter(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def draw_text(img: Image.Image, text: str, xy: tuple[int, int], size: int, font_name: str,
              color: tuple[int, int, int] | None = None) -> tuple[int, int, int, int]:
    """Draw text with its top-left at `xy` (dark on light, light on dark); returns its bounding box."""
    f = font(font_name, size)
    d = ImageDraw.Draw(img)
    bright = sum(img.getpixel((min(xy[0], img.width - 1), min(xy[1], img.height - 1)))) > 3 * 128
    fill = color or ((15, 15, 15) if bright else (245, 245, 245))
    _record(img, Mark("text", (xy[0], xy[1], xy[0], xy[1]), text=text, size=size, font=font_name))
    d.text(xy, text, font=f, fill=fill)
    return d.textbbox(xy, text, font=f)


def text_size(text: str, size: int, font_name: str) -> tuple[int, int]:
    l, t, r, b = font(font_name, size).getbbox(text)
    return r - l, b - t
