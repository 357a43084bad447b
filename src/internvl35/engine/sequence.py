"""A request as the engine sees it: token ids, where its images sit, and its KV block table."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from itertools import count

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


@dataclass(slots=True)
class Sequence:
    token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    images: list[ImageSpan] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

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
