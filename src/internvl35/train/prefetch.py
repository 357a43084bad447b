"""Training examples computed ahead by worker processes. Every example is a pure function of its
index (see `ExampleSource`), so workers can compute them in any order and the stream stays exactly
the one a single process would read: resume and any worker count see the same data. On a GPU the
data (rendering, tiling, tokenizing) is the bottleneck of a small model; on 2 CPU cores it is not,
and the default of no workers keeps everything in one process."""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import count
from typing import Any

_TARGET: Any = None  # the object whose methods a worker process calls


def _init_worker(target: Any) -> None:
    import torch

    global _TARGET
    _TARGET = target
    torch.set_num_threads(1)  # many workers side by side: one thread each


def _call(method: str, idx: int) -> Any:
    return getattr(_TARGET, method)(idx)


class Prefetcher:
    """`target.method(idx)` for idx = start, start + 1, ... in order, `depth` indices ahead."""

    def __init__(self, target: Any, workers: int, depth: int | None = None) -> None:
        self.target, self.workers = target, workers
        self.depth = depth or 8 * workers
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent holds torch's thread pools (and maybe CUDA), which a forked
            # child must not inherit
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(self.target,))
        return self._pool

    def iterate(self, method: str, start: int) -> Iterator[tuple[int, Any]]:
        if self.workers <= 0:
            fn: Callable[[int], Any] = getattr(self.target, method)
            for idx in count(start):
                yield idx, fn(idx)
            return
        pool, ahead = self._executor(), deque[tuple[int, Future]]()
        indices = count(start)
        try:
            while True:
                while len(ahead) < self.depth:
                    idx = next(indices)
                    ahead.append((idx, pool.submit(_call, method, idx)))
                idx, fut = ahead.popleft()
                yield idx, fut.result()
        finally:
            for _, fut in ahead:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
