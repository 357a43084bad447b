"""The language server's side of decoupled deployment: sends a prompt's tiles to one of several
vision servers and awaits the features, without ever blocking the engine.

Balancing: the reachable server with the fewest requests in flight. Faults: a server that is down
(no connection within `connect_grace_s`: the send fails), slow (no reply within `timeout_s`) or answers with an
error is marked down for `retry_after_s` and the request moves to the next server; when every
server has been tried the request fails with `VisionUnavailable` (HTTP 503). A restarted server is
reconnected by ZeroMQ and is tried again once its mark expires. Images already encoded come from the
feature cache and are not sent at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import torch
import zmq
import zmq.asyncio

from internvl35.chat import Prompt
from internvl35.engine.mm_cache import EncodedPrompt, FeatureCache, PendingImages
from internvl35.errors import InputError, InternVLError
from internvl35.serve.transport import ProtocolError, pack, unpack

log = logging.getLogger("internvl35.vision_client")


class VisionUnavailable(InternVLError):
    """No vision server produced the features in time."""


class _Peer:
    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a live connection: a dead peer fails fast
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.connect(endpoint)
        self.pending: dict[str, asyncio.Future] = {}
        self.down_until = 0.0
        self.reader: asyncio.Task | None = None

    async def read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            try:
                header, tensors = unpack(frames)
            except ProtocolError as e:
                log.warning("malformed reply from %s: %s", self.endpoint, e)
                continue
            fut = self.pending.pop(header.get("id"), None)
            if fut is None or fut.done():
                continue  # a reply after its timeout (the request went elsewhere)
            if header["type"] == "features" and len(tensors) == 1:
                fut.set_result((tensors[0], header["tokens_per_tile"]))
            elif header["type"] == "error" and header.get("input"):
                fut.set_exception(InputError(str(header.get("message"))))
            else:
                fut.set_exception(ProtocolError(f"{self.endpoint}: {header.get('message', header['type'])}"))


PREPROCESS = ("vision", "language")  # where images are decoded and tiled in decoupled deployment


def check_preprocess(side: str) -> None:
    if side not in PREPROCESS:
        raise ValueError(f"preprocess takes one of {', '.join(PREPROCESS)}, not {side!r}")


class RemoteVision:
    def __init__(self, endpoints: list[str], image_token_id: int, tile_tokens: int, timeout_s: float = 30.0,
                 retry_after_s: float = 2.0, cache_bytes: int = 256 * 2**20, connect_grace_s: float = 0.3,
                 preprocess: str = "vision") -> None:
        if not endpoints:
            raise ValueError("give at least one vision server endpoint")
        check_preprocess(preprocess)
        # where images are decoded and tiled: by the vision server (only the file travels) or by
        # the language server (float32 tiles travel), whichever side has the spare CPU
        self.preprocess = preprocess
        self.ctx = zmq.asyncio.Context()
        self.peers = [_Peer(self.ctx, e) for e in endpoints]
        self.image_token_id, self.tile_tokens = image_token_id, tile_tokens
        self.timeout_s, self.retry_after_s, self.connect_grace_s = timeout_s, retry_after_s, connect_grace_s
        self.features = FeatureCache(cache_bytes)
        self.stats = {"sent": 0, "retries": 0, "failures": 0, "transfer_bytes": 0}

    def close(self) -> None:
        for p in self.peers:
            if p.reader:
                p.reader.cancel()
            p.sock.close(0)
        self.ctx.term()

    async def encode(self, prompt: Prompt, flash: tuple[float, float] | None = None) -> EncodedPrompt:
        """Features for the prompt's images (cached ones are not sent) -> the engine's input. Images
        left undecoded (`Prompt.deferred`) travel as files and are tiled by the vision server.
        Raises VisionUnavailable, or InputError when a vision server cannot decode an image."""
        if prompt.pixel_values is None and not prompt.deferred:
            return EncodedPrompt(list(prompt.input_ids), None)
        pending = PendingImages.lookup(self.features, prompt, flash)
        if pending.todo:
            header = {"tiles_per_image": pending.tiles_per_image, "flash": list(flash) if flash else None}
            if prompt.deferred:
                header.update(type="encode_files", max_tiles=prompt.max_tiles)
                frames = [torch.frombuffer(bytearray(im.data), dtype=torch.uint8) for im in pending.files()]
            else:
                header.update(type="encode")
                frames = [pending.pixels().float()]
            pending.fill(self.features, *await self.request(header, frames))
        return pending.assemble(self.image_token_id, self.tile_tokens)

    def _order(self) -> list[_Peer]:
        now = time.monotonic()
        return sorted(self.peers, key=lambda p: (p.down_until > now, p.down_until, len(p.pending)))

    async def request(self, header: dict, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """One encode round trip, failing over across servers -> (bf16 features [M, D], tokens per tile)."""
        errors = []
        for attempt, peer in enumerate(self._order()):
            if attempt:
                self.stats["retries"] += 1
            try:
                return await self._call(peer, header, tensors)
            except (asyncio.TimeoutError, zmq.Again, ProtocolError) as e:
                peer.down_until = time.monotonic() + self.retry_after_s
                errors.append(f"{peer.endpoint}: {_why(e, self.timeout_s)}")
                log.warning("vision server %s failed: %s", peer.endpoint, errors[-1])
        self.stats["failures"] += 1
        raise VisionUnavailable("no vision server could encode the images (" + "; ".join(errors) + ")")

    async def _call(self, peer: _Peer, header: dict, tensors: list[torch.Tensor]):
        if peer.reader is None or peer.reader.done():
            peer.reader = asyncio.create_task(peer.read())
        rid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        peer.pending[rid] = fut
        frames = pack({**header, "id": rid}, tensors)
        try:
            deadline = time.monotonic() + self.connect_grace_s
            while True:  # a fresh or reconnecting socket gets a moment to (re)establish its connection
                try:
                    await peer.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.01)
            self.stats["sent"] += 1
            feats, per_tile = await asyncio.wait_for(fut, self.timeout_s)
        finally:
            peer.pending.pop(rid, None)
        self.stats["transfer_bytes"] += sum(t.numel() * t.element_size() for t in tensors) + feats.numel() * 2
        return feats, per_tile


def _why(e: Exception, timeout_s: float) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return f"no reply within {timeout_s:g} s"
    if isinstance(e, zmq.Again):
        return "not reachable"
    return str(e)
