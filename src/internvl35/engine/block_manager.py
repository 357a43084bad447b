"""Paged KV-cache bookkeeping (no tensors): fixed-size blocks, reference counts, and prefix caching
keyed by a hash chain over each full block's token ids and the digests of the images inside it."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from internvl35.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: list[int] = field(default_factory=list)


def block_hash(token_ids: list[int], prefix: bytes | None, image_key: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(prefix or b"")
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    h.update(image_key)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently released first (cached content survives longest). Ordered and
        # keyed, so that a prefix-cache hit on a released block takes it out in O(1): a deque's remove
        # scans the list, 1.5 ms per hit with a 4 GiB mini cache (131k blocks) vs 0.7 us.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.by_hash: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def _take(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free.popitem(last=False)
        else:
            del self.free[block_id]
        b = self.blocks[block_id]
        if b.hash is not None and self.by_hash.get(b.hash) == block_id:
            del self.by_hash[b.hash]  # its old content is being overwritten
        b.ref_count, b.hash, b.token_ids = 1, None, []
        return b

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= seq.num_blocks(self.block_size)

    def allocate(self, seq: Sequence) -> None:
        """Give `seq` a block table, reusing cached full blocks of an identical prefix."""
        assert not seq.block_table
        prefix: bytes | None = None
        n = seq.num_blocks(self.block_size)
        miss = False
        for i in range(n):
            tokens = seq.block(i, self.block_size)
            full = len(tokens) == self.block_size
            h = block_hash(tokens, prefix, seq.image_key(i, self.block_size)) if full else None
            # the block holding the last token is always computed: its logits start the generation
            miss = miss or i == n - 1
            cached = self.by_hash.get(h) if h is not None and not miss else None
            if cached is not None and self.blocks[cached].token_ids == tokens:
                b = self.blocks[cached]
                if b.ref_count == 0:
                    del self.free[cached]
                b.ref_count += 1
                seq.num_cached_tokens += self.block_size
            else:
                miss = True
                b = self._take()
                if h is not None:
                    b.hash, b.token_ids = h, list(tokens)
                    self.by_hash[h] = b.block_id
            seq.block_table.append(b.block_id)
            prefix = h

    def deallocate(self, seq: Sequence) -> None:
        """Release the blocks; cached content stays findable until a block is reused. A block is
        findable from allocation on (so that sequences admitted in the same step share it), before
        its K/V exist: one freed before they were all computed (a prefill put back for want of step
        budget, a sequence preempted before its newest token ran) is made unfindable, or the next
        sequence with that prefix would skip computing it and read whatever the slots held."""
        computed = max(seq.num_computed, seq.num_cached_tokens)
        for i in reversed(range(len(seq.block_table))):
            b = self.blocks[seq.block_table[i]]
            b.ref_count -= 1
            if b.ref_count == 0:
                self.free[b.block_id] = None
                if (i + 1) * self.block_size > computed and b.hash is not None:
                    if self.by_hash.get(b.hash) == b.block_id:
                        del self.by_hash[b.hash]
                    b.hash, b.token_ids = None, []
        seq.block_table.clear()
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """Room for the sequence's newest token (a new block is needed when it starts one)."""
        return len(seq.block_table) >= seq.num_blocks(self.block_size) or self.num_free >= 1

    def append(self, seq: Sequence) -> None:
        """Account for the token just appended to `seq`: open a block or seal a full one."""
        n = len(seq)
        if n % self.block_size == 1 or self.block_size == 1:
            if len(seq.block_table) < seq.num_blocks(self.block_size):
                seq.block_table.append(self._take().block_id)
        if n % self.block_size == 0:  # the last block just filled: make it findable
            i = n // self.block_size - 1
            prev = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            b = self.blocks[seq.block_table[i]]
            tokens = seq.block(i, self.block_size)
            b.hash, b.token_ids = block_hash(tokens, prev, seq.image_key(i, self.block_size)), list(tokens)
            self.by_hash[b.hash] = b.block_id
