"""The vision half of decoupled deployment (`internvl35 serve-vision`): ViT, projectors and the Flash
router only. A ZeroMQ ROUTER socket takes `encode` requests from any number of language servers;
each round gathers what has arrived (up to a tile budget), runs the ViT once over all of those tiles,
then the projector and router per request (the router's quantile stays per request), and replies
with bfloat16 features of the kept tokens only.

Requests carry either preprocessed tiles (`encode`) or image files (`encode_files`): then decoding,
tiling and normalisation happen here, off the language server's CPU, and the wire carries the
compressed file instead of float32 tiles."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import zmq

from internvl35.chat import ChatModel
from internvl35.config import VisionConfig
from internvl35.data.image import MAX_PIXELS, load_image
from internvl35.errors import InputError
from internvl35.serve.transport import ProtocolError, pack, unpack

log = logging.getLogger("internvl35.vision")

# ViT rows (tokens of all tiles) per pass from which its matmuls run at full speed: mini's ViT on one
# thread takes 5.05 ms per tile in 14-tile passes (910 rows) vs 5.10 ms in 56-tile ones. Larger
# passes only hold every reply back until the whole pass is done, while the language server waits
# (vit-heavy DvD, 8 clients: 13.5 req/s with 14-tile passes vs 11.7 with 64-tile ones).
FULL_SPEED_ROWS = 1024
# When requests have been left over after every pass for BACKLOG_S (the server is the slower side
# of the deployment) and BACKLOG_PASSES passes' worth are ready, a pass takes up to that many tile
# budgets: the queue sets their wait then, not the pass, and larger passes cost less per request on
# both sides (the projectors and the router run on more rows; the language server gets requests in
# larger groups and runs larger steps). Where the language side is the slower one, the queue
# empties between passes and passes stay small: larger ones would leave it without work meanwhile
# (vit-heavy DvD, 32 clients, without this guard: -7.6% without the router, +8.6% with it).
BACKLOG_S = 1.0
BACKLOG_PASSES = 3


def default_batch_tiles(cfg: VisionConfig) -> int:
    """Tiles per ViT pass by default: enough for FULL_SPEED_ROWS (mini: 15; InternViT-300M: 1)."""
    return max(1, FULL_SPEED_ROWS // (cfg.grid**2 + 1))


class VisionServer:
    def __init__(self, chat_model: ChatModel, bind: str, max_batch_tiles: int | None = None,
                 max_request_tiles: int = 256, max_pixels: int = MAX_PIXELS, decode_workers: int = 2,
                 max_queue: int = 64) -> None:
        self.chat_model, self.max_pixels, self.max_queue = chat_model, max_pixels, max_queue
        # image files decode and tile here (PIL and numpy release the GIL); 0 workers: inline
        self.pool = ThreadPoolExecutor(decode_workers, "decode") if decode_workers else None
        self.queue: list[tuple[bytes, dict, Future]] = []  # accepted requests, in arrival order
        self.model, self.cfg = chat_model.model, chat_model.cfg
        self.device, self.dtype = chat_model.device, chat_model.dtype
        self.max_batch_tiles = max_batch_tiles or default_batch_tiles(self.cfg.vision)
        self.max_request_tiles = max_request_tiles
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_request_tiles * 3 * self.cfg.vision.image_size**2 * 4 + 2**20)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stats = {"requests": 0, "tiles": 0, "batches": 0, "rejected": 0, "busy_s": 0.0}
        self._stop = False
        self._caught_up = time.monotonic()  # when a pass last left no request behind

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close(0)
        self.ctx.term()

    def serve_forever(self) -> None:
        log.info("vision server listening on %s", self.endpoint)
        try:
            while not self._stop:
                # while images are being decoded, come back soon to encode them once they are ready
                if self.sock.poll(1 if self.queue else 100) or self.queue:
                    self.step()
        finally:
            self.close()

    def step(self) -> None:
        """One round: take what has arrived, then encode every request whose tiles are ready (up to
        the tile budget) in one ViT pass and reply. Image files decode on worker threads meanwhile,
        so preprocessing of the next requests overlaps the ViT of these."""
        while len(self.queue) < self.max_queue and self.sock.poll(0):
            self._accept(self.sock.recv_multipart(copy=False))
        ready, left = [], []  # left: the queue after this round, in arrival order
        for entry in self.queue:
            ident, header, job = entry
            if not job.done():
                left.append(entry)
                continue
            try:
                ready.append((entry, *job.result()))
                left.append(entry)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                self._reject(ident, header.get("id"), e)
        budget = self.max_batch_tiles
        if (time.monotonic() - self._caught_up >= BACKLOG_S
                and sum(pv.shape[0] for _, pv, _ in ready) >= BACKLOG_PASSES * budget):
            budget *= BACKLOG_PASSES
        batch, taken, tiles = [], set(), 0
        for entry, pv, flash in ready:
            if batch and tiles + pv.shape[0] > budget:  # the next round's (a request never splits)
                continue
            batch.append((entry[0], entry[1], pv, flash))
            taken.add(id(entry))
            tiles += pv.shape[0]
        self.queue = [e for e in left if id(e) not in taken]
        if not self.queue:
            self._caught_up = time.monotonic()
        if batch:
            t = time.perf_counter()
            self._encode(batch)
            self.stats["busy_s"] += time.perf_counter() - t

    def _accept(self, frames) -> None:
        """Validate one message and queue its job; answers pings and rejects malformed input (logged,
        never fatal)."""
        ident, body = frames[0].bytes, frames[1:]
        rid = None
        try:
            header, tensors = unpack(body)
            rid = header.get("id")
            if header["type"] == "ping":
                self.sock.send_multipart([ident, *pack({"type": "pong", "id": rid})])
                return
            if header["type"] == "encode_files":
                job = self._run(lambda: self._check(header, [self._tiles(header, tensors)]))
            elif header["type"] == "encode":
                job = self._run(lambda: self._check(header, tensors), inline=True)
            else:
                raise ProtocolError(f"a vision server takes encode/encode_files/ping messages, not {header['type']!r}")
            self.queue.append((ident, header, job))
        except ProtocolError as e:
            self._reject(ident, rid, e)

    def _run(self, fn, inline: bool = False) -> Future:
        if self.pool is not None and not inline:
            return self.pool.submit(fn)
        job: Future = Future()
        try:
            job.set_result(fn())
        except Exception as e:  # noqa: BLE001 - reported when the job is collected
            job.set_exception(e)
        return job

    def _reject(self, ident: bytes, rid: str | None, e: Exception) -> None:
        if isinstance(e, InputError):  # the client's image itself is bad: not a fault of either server
            self.sock.send_multipart([ident, *pack({"type": "error", "id": rid, "message": str(e), "input": True})])
            return
        self.stats["rejected"] += 1
        log.warning("rejected message%s: %s", f" {rid}" if rid else "", e)
        self.sock.send_multipart([ident, *pack({"type": "error", "id": rid, "message": str(e)})])

    def _tiles(self, header: dict, files: list[torch.Tensor]) -> torch.Tensor:
        """Decode and tile image files exactly as the language side counted them."""
        n, tpi = header["max_tiles"], header["tiles_per_image"]
        if not isinstance(n, int) or not 1 <= n <= self.max_request_tiles:
            raise ProtocolError(f"max_tiles must be an integer in [1, {self.max_request_tiles}]")
        if not files or any(f.dtype != torch.uint8 or f.ndim != 1 for f in files):
            raise ProtocolError("encode_files takes one uint8 frame (the file bytes) per image")
        if not isinstance(tpi, list) or len(tpi) != len(files):
            raise ProtocolError(f"tiles_per_image must list {len(files)} counts, one per image")
        images = [load_image(f.numpy().tobytes(), self.max_pixels) for f in files]
        tiles = self.chat_model.image_tiles(images, n)
        if [t.shape[0] for t in tiles] != tpi:
            raise ProtocolError(f"the images make {[t.shape[0] for t in tiles]} tiles, not {tpi}: is the "
                                f"language server running the same checkpoint?")
        return torch.cat(tiles)

    def _check(self, header: dict, tensors: list) -> tuple[torch.Tensor, tuple[float, float] | None]:
        S = self.cfg.vision.image_size
        if len(tensors) != 1 or tensors[0].dtype != torch.float32 or tensors[0].ndim != 4 \
                or tuple(tensors[0].shape[1:]) != (3, S, S):
            raise ProtocolError(f"encode takes one float32 tensor [N, 3, {S}, {S}]")
        pv = tensors[0]
        tpi = header["tiles_per_image"]
        if not isinstance(tpi, list) or not all(isinstance(n, int) and n > 0 for n in tpi) \
                or sum(tpi) != pv.shape[0] or pv.shape[0] > self.max_request_tiles:
            raise ProtocolError(f"tiles_per_image {tpi!r} does not describe {pv.shape[0]} tiles "
                                f"(at most {self.max_request_tiles})")
        flash = header.get("flash")
        if flash is not None:
            if self.cfg.flash is None:
                raise ProtocolError("this checkpoint has no Flash router; send flash=None")
            if not (isinstance(flash, list) and len(flash) == 2 and all(isinstance(x, (int, float)) for x in flash)):
                raise ProtocolError("flash must be [relative, absolute] thresholds")
            flash = (float(flash[0]), float(flash[1]))
        return pv, flash

    @torch.inference_mode()
    def _encode(self, batch: list) -> None:
        encoded = self.model.encode_requests([b[2].to(self.device, self.dtype) for b in batch],
                                             [b[3] for b in batch])  # one ViT pass over the round
        for (ident, header, tiles, _), (feats, per_tile) in zip(batch, encoded):
            n = tiles.shape[0]
            reply = {"type": "features", "id": header["id"], "tokens_per_tile": per_tile}
            self.sock.send_multipart([ident, *pack(reply, [feats.to(torch.bfloat16)])], copy=False)
            self.stats["requests"] += 1
            self.stats["tiles"] += n
        self.stats["batches"] += 1


def run_vision_server(model: str, bind: str, threads: int | None = None, max_batch_tiles: int | None = None,
                      decode_workers: int = 2, device: str = "cpu") -> None:
    from internvl35.chat import load

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    chat_model = load(model, part="vision", device=device)
    server = VisionServer(chat_model, bind, max_batch_tiles, decode_workers=decode_workers)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
