"""AsyncEngine's hand-off between the engine thread and the event loop, on a scripted engine."""

from __future__ import annotations

import asyncio
import time

from internvl35.engine.llm_engine import RequestOutput
from internvl35.serve.async_engine import AsyncEngine


class _Scheduler:
    running: list = []
    waiting: list = []


class ScriptedEngine:
    """Each request yields `tokens` outputs, one per step for every unfinished request."""

    def __init__(self, tokens: int) -> None:
        self.tokens, self.left = tokens, {}
        self.scheduler = _Scheduler()
        self.steps_with_outputs = 0

    def encode_batch(self, items):
        return [p for p, _ in items]

    def add_request(self, rid, enc, params, stop=(), n=1, flash=None) -> None:
        if enc == "bad":
            raise ValueError("bad prompt")
        self.left[rid] = self.tokens

    def abort(self, rid) -> bool:
        return self.left.pop(rid, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.left)

    def step(self) -> list[RequestOutput]:
        time.sleep(0.002)  # as a forward would, lets requests arriving meanwhile join the next step
        outs = []
        for rid in list(self.left):
            self.left[rid] -= 1
            i = self.tokens - self.left[rid]
            outs.append(RequestOutput(rid, 0, [i], str(i), finished=self.left[rid] == 0))
            if self.left[rid] == 0:
                del self.left[rid]
        self.steps_with_outputs += bool(outs)
        return outs


def test_a_step_wakes_the_event_loop_once_and_every_stream_gets_its_outputs_in_order():
    engine = ScriptedEngine(tokens=5)
    ae = AsyncEngine(engine)

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakeups.append(1), real(*a, **k))[1]

        async def one(rid, prompt):
            try:
                return [o.token_ids[0] async for o in ae.generate(rid, prompt, None)]
            except ValueError as e:
                return str(e)

        got = await asyncio.gather(*(one(f"r{i}", "bad" if i == 3 else "ok") for i in range(8)))
        return got, len(wakeups)

    try:
        got, wakeups = asyncio.run(main())
    finally:
        ae.close()
    assert got[3] == "bad prompt"  # one request's error reaches that request only
    assert [g for i, g in enumerate(got) if i != 3] == [[1, 2, 3, 4, 5]] * 7
    # one wake-up per step that produced outputs, plus one for the failed request (35 outputs in all)
    assert wakeups == engine.steps_with_outputs + 1
    assert engine.steps_with_outputs < 35
