"""Supervised data: InternVL conversation records -> token ids, response-only labels and tiles;
the JSONL reader, the mini-world source, and greedy packing into fixed-budget sequences.

A record is `{"image": path | [paths] | PIL | [PIL], "video": path | [frames], "system": str,
"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}`.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from internvl35.data.image import load_image, preprocess_image, tiles_to_tensor
from internvl35.data.template import THINKING_SYSTEM, Template, attach_images, expand_image_tokens
from internvl35.data.tokenizer import Tokenizer
from internvl35.data.video import load_frames

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    pixel_values: torch.Tensor | None  # [T, 3, S, S]


@dataclass(frozen=True)
class ImageSettings:
    image_size: int
    max_tiles: int
    tokens_per_tile: int
    use_thumbnail: bool = True
    jpeg_augment: bool = False  # random JPEG re-encoding, quality 75..100 (training only)


def _jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(75, 100))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def record_tiles(record: dict[str, Any], s: ImageSettings, rng: random.Random, root: Path | None = None
                 ) -> tuple[list[torch.Tensor], bool]:
    """Tiles per image (or one per video frame) of a record, and whether it is a video."""
    def img(x):
        im = load_image(root / x if root is not None and isinstance(x, str) else x)
        return _jpeg(im, rng) if s.jpeg_augment else im

    if record.get("video") is not None:
        v = record["video"]
        frames = load_frames([img(f) for f in v] if isinstance(v, list) else (root / v if root else v))
        return [tiles_to_tensor([f], s.image_size) for f in frames], True
    images = record.get("image")
    if images is None:
        return [], False
    images = images if isinstance(images, list) else [images]
    per_image = max(1, s.max_tiles // len(images))  # multi-image: share the tile budget
    return [preprocess_image(img(x), s.image_size, per_image, s.use_thumbnail) for x in images], False


def tokenize_record(record: dict[str, Any], tok: Tokenizer, template: Template, s: ImageSettings,
                    rng: random.Random, root: Path | None = None, system: str | None = None) -> Example:
    """Render turn by turn; loss only on assistant text and its end-of-turn token."""
    tiles, is_video = record_tiles(record, s, rng, root)
    turns = record["conversations"]
    if not turns or turns[0]["from"] != "human" or len(turns) % 2:
        raise ValueError("conversations must alternate human/gpt, starting with human")
    first = attach_images(turns[0]["value"], [], len(tiles), is_video)
    counts = [t.shape[0] for t in tiles]
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, train: bool) -> None:
        piece = tok.encode(text)
        ids.extend(piece)
        labels.extend(piece if train else [IGNORE] * len(piece))

    default = template.default_system if system is None else system
    add(template.system.format(system=record.get("system", default)) + template.sep, False)
    for i in range(0, len(turns), 2):
        q = first if i == 0 else turns[i]["value"]
        n_here = q.count("<image>")
        q = expand_image_tokens(q, counts[:n_here], s.tokens_per_tile)
        counts = counts[n_here:]
        add(template.user + q + template.sep + template.assistant, False)
        add(turns[i + 1]["value"] + template.stop, True)
        add(template.sep[len(template.stop):], False)  # the newline after <|im_end|>
    pv = torch.cat(tiles) if tiles else None
    return Example(ids, labels, pv)


def jsonl_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
    return records


def world_record(family: str, seed: int, alt: bool = False, easy: bool = False,
                 big_text: bool = False, followups: bool = False) -> dict[str, Any]:
    """A mini-world sample as a conversation record (PIL images in memory); `followups` appends the
    sample's further questions about the same images as more turns."""
    from internvl35.data.world import Style, generate

    s = generate(family, seed, Style(alt=alt, easy=easy, big_text=big_text))
    turns = [(s.question, s.answer)] + (s.followups if followups else [])
    rec: dict[str, Any] = {"conversations": [{"from": f, "value": v} for q, a in turns
                                             for f, v in (("human", q), ("gpt", a))]}
    if s.video:
        rec["video"] = s.images
    elif s.images:
        rec["image"] = s.images
    if s.thinking:
        rec["system"] = THINKING_SYSTEM
    return rec


@dataclass
class Pack:
    """Several examples in one sequence: attention is block-diagonal, positions restart per example."""

    input_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L]
    positions: torch.Tensor  # [L]
    segments: torch.Tensor  # [L] example index within the pack
    pixel_values: torch.Tensor | None
    num_examples: int

    def to(self, device: torch.device) -> Pack:
        pv = None if self.pixel_values is None else self.pixel_values.to(device)
        return Pack(self.input_ids.to(device), self.labels.to(device), self.positions.to(device),
                    self.segments.to(device), pv, self.num_examples)


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[L] example ids -> [1, 1, L, L]: causal within each example of a pack, nothing across."""
    L = segments.shape[0]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments[:, None] == segments[None, :]))[None, None]


def pack(examples: list[Example]) -> Pack:
    ids, labels, pos, seg, pvs = [], [], [], [], []
    for i, e in enumerate(examples):
        ids += e.input_ids
        labels += e.labels
        pos += range(len(e.input_ids))
        seg += [i] * len(e.input_ids)
        if e.pixel_values is not None:
            pvs.append(e.pixel_values)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Pack(t(ids), t(labels), t(pos), t(seg), torch.cat(pvs) if pvs else None, len(examples))


def pack_stream(examples: Iterator[tuple[int, Example]], max_tokens: int) -> Iterator[tuple[int, Pack]]:
    """Greedy packing of (index, example) into packs of <= max_tokens tokens. Yields (index of the first
    example of the next pack, pack) so a resumed run restarts exactly after the last pack."""
    buf: list[Example] = []
    used = 0
    for idx, e in examples:
        n = len(e.input_ids)
        if n > max_tokens:
            raise ValueError(f"example {idx} has {n} tokens, more than max_tokens={max_tokens}")
        if used + n > max_tokens:
            yield idx, pack(buf)
            buf, used = [], 0
        buf.append(e)
        used += n
