"""Continuous batching policy (no tensors): which sequences run this step and with how many tokens.

Every step decodes one token for each running sequence and admits waiting prompts (whole prefills,
their cached prefix skipped) while the token budget, the sequence cap and the free KV blocks allow,
so prefills and decodes share a step. When a decode needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it later recomputes its tokens
(cheap with the prefix cache, which keeps the freed blocks findable).
"""

from __future__ import annotations

from collections import deque

from internvl35.engine.block_manager import BlockManager
from internvl35.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.bm = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """-> [(sequence, number of new tokens to compute)], decodes first, then prefills."""
        batch: list[tuple[Sequence, int]] = []
        kept: deque[Sequence] = deque()
        while self.running:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.bm.append(seq)
                kept.append(seq)
                batch.append((seq, 1))
        self.running = kept
        budget = self.max_num_batched_tokens - len(batch)
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq):
                break
            self.bm.allocate(seq)
            new = len(seq) - seq.num_cached_tokens
            if new > budget and batch:  # too long for this step's budget: wait for a lighter step
                self.bm.deallocate(seq)
                break
            self.waiting.popleft()
            seq.num_computed, seq.status = seq.num_cached_tokens, Status.RUNNING
            self.running.append(seq)
            batch.append((seq, new))
            budget -= new
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.bm.deallocate(seq)
        seq.status, seq.num_computed = Status.WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.bm.deallocate(seq)
        if seq in self.running:
            self.running.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Drop every sequence of a request, waiting or running; returns them."""
        dropped = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for s in dropped:
            if s in self.waiting:
                self.waiting.remove(s)
            else:
                self.running.remove(s)
                self.bm.deallocate(s)
            s.status, s.finish_reason = Status.FINISHED, "abort"
        return dropped
