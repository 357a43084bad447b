"""Drives the single-threaded `LLMEngine` from one background thread and hands each request's
outputs to the asyncio task that asked for them.

Requests and aborts enter through a thread-safe inbox, so the engine is only ever touched by its own
thread; an error in one request (bad input found while encoding) goes back to that request only.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from internvl35.engine.llm_engine import LLMEngine, RequestOutput

log = logging.getLogger("internvl35.serve")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int
    started: float = field(default_factory=time.perf_counter)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = False
        self.counters = {"requests_total": 0, "requests_failed": 0, "requests_aborted": 0}
        self.busy_s = 0.0  # time spent in engine steps: how loaded the language side is
        self._thread = threading.Thread(target=self._loop, name="internvl35-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    async def generate(self, request_id: str, prompt, params, stop: tuple[str, ...] = (), n: int = 1,
                       flash: tuple[float, float] | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs as they are produced; leaving early aborts it."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), n)
        self._streams[request_id] = stream
        self.counters["requests_total"] += 1
        self._put(("add", request_id, prompt, params, stop, n, flash))
        finished = 0
        try:
            while finished < n:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    self.counters["requests_failed"] += 1
                    raise item
                finished += item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if finished < n:  # the client went away or an error surfaced: free its sequences
                self.counters["requests_aborted"] += 1
                self._put(("abort", request_id))

    def _put(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand items to their requests' streams with one call into each event loop, not one per
        item: every call writes to the loop's self-pipe (one call per output cost 72-75 us more per
        32-output step on one core)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _drain_inbox(self) -> None:
        """Take every waiting message; the new requests' images are encoded together (one ViT pass
        over all their tiles instead of one per request)."""
        adds, aborts = [], []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "abort":
                aborts.append(msg[1])
            elif msg[1] in self._streams:  # else gone before it started
                adds.append(msg)
        if adds:
            self._add(adds)
        for rid in aborts:  # after the adds: an abort may belong to a request added just now
            self.engine.abort(rid)

    def _add(self, adds: list[tuple]) -> None:
        try:
            encoded = self.engine.encode_batch([(m[2], m[6]) for m in adds])
        except Exception as e:  # noqa: BLE001 - a failed vision pass fails these requests only
            log.exception("vision encoding failed")
            encoded = [e] * len(adds)
        for (_, rid, _, params, stop, n, flash), enc in zip(adds, encoded):
            try:
                if isinstance(enc, Exception):
                    raise enc
                self.engine.add_request(rid, enc, params, stop, n, flash)
            except Exception as e:  # noqa: BLE001 - bad input (or a bug) belongs to this request only
                self._deliver(rid, e)

    def _loop(self) -> None:
        while not self._stop:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                t = time.perf_counter()
                outputs = self.engine.step()
                self.busy_s += time.perf_counter() - t
            except Exception as e:  # noqa: BLE001 - fail what is running, keep serving
                log.exception("engine step failed")
                for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
                    self.engine.abort(seq.request_id)
                    self._deliver(seq.request_id, RuntimeError(f"engine step failed: {e}"))
                continue
            self._deliver_all([(out.request_id, out) for out in outputs])


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
