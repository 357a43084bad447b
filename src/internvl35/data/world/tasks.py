"""Task families of the mini world. Each generator draws one verifiable sample from `rng`; images
are sized so that the simple families fit one tile and the high-resolution family needs tiling."""

from __future__ import annotations

import random

from PIL import ImageDraw

from internvl35.config import CONFIGS
from internvl35.data.world.render import (COLORS, SHAPES, Style, canvas, draw_bar, draw_shape, draw_text,
                                          place_boxes, text_size)
from internvl35.data.world.sample import Sample

# Scenes are drawn at about BASE px a side (one tile after resizing); the high-resolution family is drawn
# at the mini model's native tile size, so its small text is legible only in full-resolution tiles.
BASE = 112
TILE = CONFIGS["mini"].vision.image_size
WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "bird", "star", "moon", "home", "rain", "ship", "lamp",
         "door", "milk", "road", "ring", "cake", "gold", "blue", "frog", "wind", "king", "leaf", "bell", "coin",
         "hat", "box", "pen", "map", "cup", "key", "egg", "ice", "owl", "zoo", "apple", "house", "river",
         "green", "robot", "piano", "tiger", "smile", "cloud", "train", "light", "water", "stone", "bread")
COLOR_NAMES = tuple(COLORS)


def _size(rng: random.Random, lo: int = 100, hi: int = 132) -> tuple[int, int]:
    return rng.randint(lo, hi), rng.randint(lo, hi)


def _objects(rng: random.Random, n: int, distinct: bool = True) -> list[tuple[str, str]]:
    """n (color, shape) pairs; distinct pairs when asked."""
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPES]
    return rng.sample(pairs, n) if distinct else [rng.choice(pairs) for _ in range(n)]


def _count(rng: random.Random, style: Style, lo: int, hi: int) -> int:
    return lo if style.easy else rng.randint(lo, hi)


def _scene(rng: random.Random, style: Style, objs: list[tuple[str, str]], size_range=(20, 36),
           wh: tuple[int, int] | None = None):
    """Draw objects at random places; retries until everything fits. Returns (image, boxes)."""
    if style.easy:  # larger objects for the curriculum
        size_range = (int(size_range[0] * 1.5), int(size_range[1] * 1.5))
    while True:
        w, h = wh or _size(rng)
        boxes = place_boxes(w, h, [rng.randint(*size_range) for _ in objs], rng)
        if boxes is not None:
            break
    img = canvas(w, h, rng, style)
    for (color, shape), b in zip(objs, boxes):
        draw_shape(img, shape, color, b, rng, style)
    return img, boxes


def attributes(rng: random.Random, style: Style) -> Sample:
    objs = _objects(rng, _count(rng, style, 1, 3))
    # the asked-about shape (or colour) must be unique in the scene
    shapes = [s for _, s in objs]
    colors = [c for c, _ in objs]
    img, _ = _scene(rng, style, objs)
    i = rng.randrange(len(objs))
    color, shape = objs[i]
    more = _object_questions(objs)
    if rng.random() < 0.6 and shapes.count(shape) == 1:
        q = rng.choice(["What color is the {s}?", "What is the color of the {s}?", "Which color is the {s}?"])
        return Sample("attributes", q.format(s=shape), color, [img], followups=more)
    if colors.count(color) == 1:
        q = rng.choice(["What shape is the {c} object?", "Which shape is {c}?", "What is the shape of the {c} object?"])
        return Sample("attributes", q.format(c=color), shape, [img], followups=more)
    return attributes(rng, style)


def _object_questions(objs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Colour of every shape and shape of every colour that is unique in the scene, and the total."""
    shapes, colors = [s for _, s in objs], [c for c, _ in objs]
    out = [(f"What color is the {s}?", c) for c, s in objs if shapes.count(s) == 1]
    out += [(f"What shape is the {c} object?", s) for c, s in objs if colors.count(c) == 1]
    n = len(objs)
    return out + [("How many objects are there in total?", str(n))]


def counting(rng: random.Random, style: Style) -> Sample:
    n = rng.randint(0, 4) if style.easy else rng.randint(0, 9)
    if rng.random() < 0.7:
        shape = rng.choice(SHAPES)
        objs = [(rng.choice(COLOR_NAMES), shape) for _ in range(n)]
        objs += [(rng.choice(COLOR_NAMES), rng.choice([s for s in SHAPES if s != shape]))
                 for _ in range(rng.randint(0, 3))]
        q = rng.choice(["How many {s}s are there?", "Count the {s}s in the image.", "How many {s}s can you see?"])
        q = q.format(s=shape)
    else:
        color = rng.choice(COLOR_NAMES)
        objs = [(color, rng.choice(SHAPES)) for _ in range(n)]
        objs += [(rng.choice([c for c in COLOR_NAMES if c != color]), rng.choice(SHAPES))
                 for _ in range(rng.randint(0, 3))]
        q = rng.choice(["How many {c} objects are there?", "Count the {c} objects."]).format(c=color)
    rng.shuffle(objs)
    img, _ = _scene(rng, style, objs, size_range=(12, 20), wh=_size(rng, 112, 140))
    more = [(f"How many {s}s are there?", str(sum(o[1] == s for o in objs))) for s in SHAPES]
    more += [("How many objects are there in total?", str(len(objs)))]
    return Sample("counting", q, str(n), [img], followups=rng.sample(more, 3))


def spatial(rng: random.Random, style: Style) -> Sample:
    objs = _objects(rng, 2)
    while True:
        img, boxes = _scene(rng, style, objs)
        (ax, ay), (bx, by) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
        axis = rng.choice(["x", "y"])
        d = (bx - ax) if axis == "x" else (by - ay)
        if abs(d) >= 12:
            break
    (c1, s1), (c2, s2) = objs
    rel = rng.choice(["left", "right"] if axis == "x" else ["above", "below"])
    truth = {"left": d > 0, "right": d < 0, "above": d > 0, "below": d < 0}[rel]
    phrase = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[rel]
    q = f"Is the {c1} {s1} {phrase} the {c2} {s2}?"
    opposite = {"left": "to the right of", "right": "to the left of", "above": "below", "below": "above"}[rel]
    more = [(f"Is the {c2} {s2} {phrase} the {c1} {s1}?", "No" if truth else "Yes"),
            (f"Is the {c1} {s1} {opposite} the {c2} {s2}?", "No" if truth else "Yes"),
            (f"Which object is more to the {'left' if axis == 'x' else 'top'}?",
             f"the {c1} {s1}" if d > 0 else f"the {c2} {s2}")]
    return Sample("spatial", q, "Yes" if truth else "No", [img], followups=more)


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS) if rng.random() < 0.7 else str(rng.randint(0, 999))


def text(rng: random.Random, style: Style) -> Sample:
    word = _word(rng)
    w, h = _size(rng, 104, 132)
    img = canvas(w, h, rng, style)
    fname = style.font_name(rng)
    size = rng.randint(28, 36) if style.big_text else rng.randint(15, 24)
    tw, th = text_size(word, size, fname)
    while tw > w - 8:
        size -= 1
        tw, th = text_size(word, size, fname)
    draw_text(img, word, (rng.randint(2, w - tw - 4), rng.randint(0, max(0, h - th - 8))), size, fname)
    if rng.random() < 0.3 and not style.big_text:  # a distractor shape
        box = place_boxes(w, h, [14], rng)
        if box:
            draw_shape(img, rng.choice(SHAPES), rng.choice(COLOR_NAMES), box[0], rng, style)
    q = rng.choice(["What is written in the image?", "Read the text in the image.", "What word is shown?"])
    return Sample("text", q, word, [img], followups=_spelling(word))


def _spelling(word: str) -> list[tuple[str, str]]:
    """Character-level questions: a word is usually one token, its glyphs are several."""
    return [("Spell the text in the image letter by letter.", " ".join(word)),
            ("What is the first character of the text?", word[0]),
            ("How many characters does the text have?", str(len(word)))]


def grounding(rng: random.Random, style: Style) -> Sample:
    objs = _objects(rng, _count(rng, style, 1, 3))
    img, boxes = _scene(rng, style, objs, size_range=(18, 40))
    w, h = img.size
    qa = []
    for (color, shape), b in zip(objs, boxes):
        box = [round(b[0] * 1000 / w), round(b[1] * 1000 / h), round(b[2] * 1000 / w), round(b[3] * 1000 / h)]
        ref = f"<ref>the {color} {shape}</ref>"
        q = f"Please provide the bounding box coordinate of the region this sentence describes: {ref}"
        qa.append((q, f"{ref}<box>[[{box[0]}, {box[1]}, {box[2]}, {box[3]}]]</box>", box))
    i = rng.randrange(len(objs))
    q, a, box = qa.pop(i)
    return Sample("grounding", q, a, [img], meta={"box": box}, followups=[(q2, a2) for q2, a2, _ in qa])


def hires(rng: random.Random, style: Style) -> Sample:
    """A small word in a wide or tall image: legible only when the image is tiled."""
    long_side = rng.choice([3, 4]) * TILE
    w, h = (long_side, TILE) if rng.random() < 0.6 else (TILE, long_side)
    img = canvas(w, h, rng, style)
    for _ in range(rng.randint(1, 3)):  # large distractors
        b = place_boxes(w, h, [rng.randint(24, 40)], rng)
        if b:
            draw_shape(img, rng.choice(SHAPES), rng.choice(COLOR_NAMES), b[0], rng, style)
    word = rng.choice(WORDS)
    fname = style.font_name(rng)
    size = rng.randint(11, 13)
    tw, th = text_size(word, size, fname)
    draw_text(img, word, (rng.randint(2, w - tw - 4), rng.randint(0, h - th - 8)), size, fname)
    q = rng.choice(["What is the small word in the image?", "Read the small text in the image."])
    return Sample("hires", q, word, [img], followups=_spelling(word)[:1])


def charts(rng: random.Random, style: Style) -> Sample:
    n = rng.randint(3, 5)
    labels = "ABCDE"[:n]
    values = [rng.randint(1, 9) for _ in range(n)]
    w, h = BASE, BASE
    img = canvas(w, h, rng, style)
    d = ImageDraw.Draw(img)
    base, unit, left = h - 16, 9, 14
    for v in range(10):  # gridlines at every unit
        d.line([(left, base - v * unit), (w - 2, base - v * unit)], fill=(200, 200, 200) if v else (20, 20, 20))
    bw = (w - left - 4) // n
    color = rng.choice([c for c in COLOR_NAMES if c not in ("white",)])
    fname = style.font_name(rng)
    for i, (lab, v) in enumerate(zip(labels, values)):
        x = left + i * bw + 3
        draw_bar(img, (x, base - v * unit, x + bw - 6, base), color)
        draw_text(img, lab, (x + (bw - 6) // 2 - 3, base + 2), 11, fname)
    kind = rng.random()
    more = [(f"What is the value of bar {lab}?", str(v)) for lab, v in zip(labels, values)]
    if kind < 0.5:
        i = rng.randrange(n)
        q = rng.choice(["What is the value of bar {l}?", "How tall is bar {l}?"]).format(l=labels[i])
        return Sample("charts", q, str(values[i]), [img], followups=more)
    best = max(values) if kind < 0.8 else min(values)
    if values.count(best) > 1:
        return charts(rng, style)
    word = "largest" if kind < 0.8 else "smallest"
    return Sample("charts", f"Which bar is the {word}?", labels[values.index(best)], [img], followups=more)


def multi_image(rng: random.Random, style: Style) -> Sample:
    k = rng.randint(2, 3)
    objs = _objects(rng, k)
    images = [_scene(rng, style, [o])[0] for o in objs]
    kind = rng.random()
    if kind < 0.5:
        i = rng.randrange(k)
        q = f"Which image contains the {objs[i][0]} {objs[i][1]}? Answer with the image name."
        return Sample("multi_image", q, f"Image-{i + 1}", images)
    if kind < 0.75 and k == 2:
        same = rng.random() < 0.5
        if same:
            objs[1] = (rng.choice([c for c in COLOR_NAMES if c != objs[0][0]]), objs[0][1])
            images[1] = _scene(rng, style, [objs[1]])[0]
        return Sample("multi_image", "Do the two images show the same shape?", "Yes" if same else "No", images)
    shape = rng.choice(SHAPES)
    return Sample("multi_image", f"How many of the images contain a {shape}?",
                  str(sum(s == shape for _, s in objs)), images)


def video(rng: random.Random, style: Style) -> Sample:
    (color, shape), = _objects(rng, 1)
    direction = rng.choice(["left", "right", "up", "down"])
    n = rng.randint(4, 6)
    s = rng.randint(16, 24)
    w = h = BASE
    travel = rng.randint(40, w - s - 10)
    x0, y0 = rng.randint(4, w - s - 4), rng.randint(4, h - s - 4)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    if dx:
        x0 = (w - s - 4 - travel) // 2 + (travel if dx < 0 else 0) + rng.randint(-6, 6)
    else:
        y0 = (h - s - 4 - travel) // 2 + (travel if dy < 0 else 0) + rng.randint(-6, 6)
    bg = canvas(w, h, rng, style)
    frames = []
    for f in range(n):
        img = bg.copy()
        x = int(x0 + dx * travel * f / (n - 1))
        y = int(y0 + dy * travel * f / (n - 1))
        x, y = max(0, min(w - s, x)), max(0, min(h - s, y))
        draw_shape(img, shape, color, (x, y, x + s, y + s), rng, style)
        frames.append(img)
    q = rng.choice([f"In which direction does the {color} {shape} move?", f"Where is the {shape} moving?"])
    return Sample("video", q + " Answer left, right, up or down.", direction, frames, video=True)


def arithmetic(rng: random.Random, style: Style) -> Sample:
    """An expression to read and evaluate; half the samples carry a <think> trace."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice(["+", "-", "x"])
    if op == "-" and b > a:
        a, b = b, a
    r = {"+": a + b, "-": a - b, "x": a * b}[op]
    w, h = _size(rng, 104, 132)
    img = canvas(w, h, rng, style)
    fname = style.font_name(rng)
    expr = f"{a} {op} {b}"
    size = rng.randint(18, 26)
    tw, th = text_size(expr, size, fname)
    draw_text(img, expr, (rng.randint(2, w - tw - 4), rng.randint(0, h - th - 8)), size, fname)
    thinking = rng.random() < 0.5
    q = rng.choice(["What is the result of the expression in the image?", "Compute the expression shown."])
    word = {"+": "plus", "-": "minus", "x": "times"}[op]
    ans = f"<think>The image shows {a} {op} {b}, that is {a} {word} {b}. {a} {word} {b} is {r}.</think>\n{r}" \
        if thinking else str(r)
    return Sample("arithmetic", q, ans, [img], thinking=thinking)


def _where(box: tuple[int, int, int, int], w: int, h: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    u = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{v} {u}".strip() or "center"


def caption(rng: random.Random, style: Style) -> Sample:
    """Dense description of every object (colour, shape, place): the pre-training signal."""
    objs = _objects(rng, _count(rng, style, 1, 3), distinct=False)
    img, boxes = _scene(rng, style, objs, size_range=(20, 50))
    w, h = img.size
    parts = [f"a {c} {s} at the {_where(b, w, h)}" for (c, s), b in
             sorted(zip(objs, boxes), key=lambda o: (o[1][1] // 40, o[1][0]))]
    n = len(objs)
    text = f"{n} object{'s' if n > 1 else ''}: " + ", ".join(parts) + "."
    q = rng.choice(["Describe the image.", "What is in the image?", "Describe the objects in the image."])
    return Sample("caption", q, text, [img])


OPPOSITES = {"up": "down", "left": "right", "big": "small", "hot": "cold", "day": "night", "yes": "no",
             "black": "white", "open": "closed", "fast": "slow", "old": "new"}


def text_only(rng: random.Random, style: Style) -> Sample:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return Sample("text_only", f"What is {a} plus {b}?", str(a + b))
    if kind == 1:
        w = rng.choice(WORDS)
        return Sample("text_only", f"Spell the word {w} backwards.", w[::-1])
    if kind == 2:
        w = rng.choice(WORDS)
        return Sample("text_only", f"Repeat this word: {w}", w)
    k = rng.choice(list(OPPOSITES))
    return Sample("text_only", f"What is the opposite of {k}?", OPPOSITES[k])


FAMILIES = {
    "attributes": attributes, "counting": counting, "spatial": spatial, "text": text, "grounding": grounding,
    "hires": hires, "charts": charts, "multi_image": multi_image, "video": video, "arithmetic": arithmetic,
    "text_only": text_only, "caption": caption,
}
EVAL_FAMILIES = [f for f in FAMILIES if f != "caption"]  # caption is a training signal, not a target


def generate(family: str, seed: int, style: Style = Style()) -> Sample:
    """The sample of `family` for `seed` (deterministic)."""
    return FAMILIES[family](random.Random(f"{family}:{seed}"), style)
