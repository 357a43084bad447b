"""Vision-feature cache: image content digest -> projected features, LRU under a byte cap.

A repeated image skips the vision tower even when its prompt context differs (the KV prefix cache
only helps when everything before the image is identical too).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def image_digest(tiles: torch.Tensor, flash: tuple[float, float] | None = None) -> bytes:
    """Content hash of one image's preprocessed tiles [N, 3, S, S] (+ the Flash thresholds, which
    change how many tokens it becomes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(tiles.shape), str(tiles.dtype), flash)).encode())
    h.update(tiles.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


class FeatureCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[bytes, tuple[torch.Tensor, list[int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: bytes) -> tuple[torch.Tensor, list[int]] | None:
        """(features [M, D], tokens per tile) or None; a hit becomes the most recently used."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item

    def put(self, key: bytes, features: torch.Tensor, tokens_per_tile: list[int]) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._items:
            return
        while self.bytes + size > self.max_bytes:
            _, (old, _) = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self._items[key] = (features, tokens_per_tile)
        self.bytes += size
