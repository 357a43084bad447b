"""A request as the engine sees it: token ids, where its images sit, sampling state, its KV blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count

import torch

from internvl35.engine.detokenizer import IncrementalDecoder
from internvl35.sampling import SamplingParams

_ids = count()


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(slots=True)
class ImageSpan:
    """`length` <IMG_CONTEXT> positions starting at `start`, filled by the image with content `digest`."""

    start: int
    length: int
    digest: bytes


@dataclass(slots=True, eq=False)  # identity: the scheduler finds sequences in its queues by `in`
class Sequence:
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    images: list[ImageSpan] = field(default_factory=list)
    # Feature rows [M, D] for the prompt's M <IMG_CONTEXT> tokens, in order (None: text only).
    features: torch.Tensor | None = None
    stop: tuple[str, ...] = ()
    request_id: str = ""
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_computed: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    text: str = ""  # completion text sent so far (stop strings cut it)
    decoder: IncrementalDecoder | None = None  # the completion's text (the engine sets it)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)
        if self.params.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def num_blocks(self, block_size: int) -> int:
        return (len(self) + block_size - 1) // block_size

    def block(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def image_key(self, i: int, block_size: int) -> bytes:
        """Content digests (with offsets) of every image overlapping block i: two different images
        behind the same <IMG_CONTEXT> ids must not share cached KV."""
        lo, hi = i * block_size, (i + 1) * block_size
        parts = [s.digest + (s.start - lo).to_bytes(8, "little", signed=True)
                 for s in self.images if s.start < hi and s.start + s.length > lo]
        return b"".join(parts)

    def feature_rows(self, start: int, end: int) -> tuple[int, int]:
        """Rows of `features` that fill the <IMG_CONTEXT> tokens among positions [start, end)."""
        before = sum(min(max(start - s.start, 0), s.length) for s in self.images)
        inside = sum(max(0, min(end, s.start + s.length) - max(start, s.start)) for s in self.images)
        return before, before + inside
