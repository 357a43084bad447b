"""A sample of the mini world: images, a question, the reference answer, and how to check answers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from internvl35.data.template import THINK_END

# The <box> tags are optional: tokenizers that mark them special drop them when decoding.
BOX = re.compile(r"(?:<box>)?\[\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]\](?:</box>)?")


@dataclass
class Sample:
    family: str
    question: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    video: bool = False
    thinking: bool = False  # trained/evaluated with the thinking system prompt
    meta: dict[str, Any] = field(default_factory=dict)
    # More (question, answer) turns about the same images: training may append them to the
    # conversation (more supervision per image); evaluation asks `question` only.
    followups: list[tuple[str, str]] = field(default_factory=list)


def normalise(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def final_answer(text: str) -> str:
    """The part after </think> (the whole text when there is no reasoning span)."""
    return text.split(THINK_END, 1)[1] if THINK_END in text else text


def iou(a: list[int], b: list[int]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def is_correct(sample: Sample, prediction: str) -> bool:
    """Grounding: IoU >= 0.5 with the reference box; everything else: normalised exact match of the
    final answer."""
    if sample.family == "grounding":
        m = BOX.search(prediction)
        return m is not None and iou([int(g) for g in m.groups()], sample.meta["box"]) >= 0.5
    return normalise(final_answer(prediction)) == normalise(final_answer(sample.answer))
