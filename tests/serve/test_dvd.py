"""Decoupled deployment: wire format, a real vision server on loopback, features bit-identical to
local BF16 ones, Flash over the wire, faults (down, slow, restarted, malformed), and the OpenAI
server in front of remote vision."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import msgpack
import openai
import pytest
import torch
import zmq
from PIL import Image

import internvl35
from internvl35.data.image import EncodedImage
from internvl35.errors import InputError
from internvl35.data.world import generate
from internvl35.engine.llm_engine import LLMEngine
from internvl35.engine.mm_cache import EncodedPrompt
from internvl35.sampling import SamplingParams
from internvl35.serve.transport import ProtocolError, pack, unpack
from internvl35.serve.vision_client import RemoteVision, VisionUnavailable
from internvl35.serve.vision_server import VisionServer
from internvl35.serve.server import create_app
from tests.serve.test_openai_server import data_url, free_port, metric, png_bytes, serving, user


@pytest.fixture(scope="module")
def vision_model():
    return internvl35.load("mini", part="vision")


class Running:
    """A vision server on its own thread."""

    def __init__(self, model, bind: str) -> None:
        self.server = VisionServer(model, bind)
        self.endpoint = self.server.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=5)


@pytest.fixture()
def vision(vision_model):
    r = Running(vision_model, "tcp://127.0.0.1:*")
    yield r
    r.stop()


def client_for(mini, endpoints, **kw) -> RemoteVision:
    return RemoteVision(endpoints, mini.tokenizer.img_context_id, mini.cfg.num_image_token, **kw)


def test_wire_format_round_trip_and_rejects_malformed():
    t = torch.randn(3, 5).to(torch.bfloat16)
    header, (back,) = unpack([bytes(f) for f in pack({"type": "features", "id": "a", "tokens_per_tile": [3]}, [t])])
    assert header["tokens_per_tile"] == [3] and torch.equal(back.view(torch.int16), t.view(torch.int16))
    good = pack({"type": "encode", "id": "x", "tiles_per_image": [1]}, [torch.zeros(2, 2)])
    bad = {
        "not msgpack": [b"\xc1\xc1", *good[1:]],
        "unknown type": [msgpack.packb({"v": 1, "type": "shell", "id": "x", "tensors": []})],
        "missing field": [msgpack.packb({"v": 1, "type": "encode", "tensors": []})],
        "frame count": [good[0]],
        "size": [good[0], b"\x00" * 3],
        "id type": [msgpack.packb({"v": 1, "type": "ping", "id": [1, 2], "tensors": []})],
        "dtype": [msgpack.packb({"v": 1, "type": "encode", "id": "x", "tiles_per_image": [1],
                                 "tensors": [{"dtype": "object", "shape": [1]}]}), b"\x00" * 8],
    }
    for name, frames in bad.items():
        with pytest.raises(ProtocolError):
            unpack(frames)


def test_remote_features_bit_identical_to_local_bf16(mini, vision):
    s = generate("hires", 2**48 + 21)
    prompt = mini.build_prompt(s.question, s.images)
    client = client_for(mini, [vision.endpoint], timeout_s=30)
    enc = asyncio.run(client.encode(prompt))
    with torch.inference_mode():
        local, per_tile = mini.model.encode_images(prompt.pixel_values)
    assert enc.features.dtype == torch.bfloat16 and len(prompt.tiles_per_image) == 1
    assert torch.equal(enc.features.view(torch.int16), local.to(torch.bfloat16).view(torch.int16))
    assert enc.input_ids == prompt.input_ids and enc.spans[0].length == sum(per_tile)
    again = asyncio.run(client.encode(prompt))  # the image is encoded once: the second comes from cache
    assert client.stats["sent"] == 1 and torch.equal(again.features, enc.features)
    client.close()


def test_files_are_tiled_by_the_vision_server_with_identical_features(mini, vision):
    # the language side sends the PNG and only counts tiles; the vision server decodes and tiles it
    s = generate("hires", 2**48 + 28)
    png = png_bytes(s.images[0])
    files = [EncodedImage.probe(png), EncodedImage.probe(png_bytes(generate("attributes", 2**48 + 29).images[0]))]
    client = client_for(mini, [vision.endpoint])
    for flash in (None, (0.5, 0.0)):
        deferred = mini.build_prompt(s.question, files, decode_images=False)
        decoded = mini.build_prompt(s.question, [Image.open(io.BytesIO(f.data)) for f in files])
        assert deferred.pixel_values is None and deferred.input_ids == decoded.input_ids
        assert deferred.tiles_per_image == decoded.tiles_per_image and sum(decoded.tiles_per_image) > 2
        enc = asyncio.run(client.encode(deferred, flash))
        local = LLMEngine(mini).encode(decoded, flash)
        assert enc.input_ids == local.input_ids
        assert torch.equal(enc.features.view(torch.int16), local.features.to(torch.bfloat16).view(torch.int16))
        assert LLMEngine(mini).encode(deferred, flash).input_ids == local.input_ids  # decoded locally too
        if flash is None:  # the wire carried the files and the features, not float32 tiles
            assert client.stats["transfer_bytes"] == sum(len(f.data) for f in files) + enc.features.numel() * 2
            assert sum(len(f.data) for f in files) < decoded.pixel_values.numel() * 4 / 2
    client.close()


def test_undecodable_file_is_the_clients_error_not_a_server_fault(mini, vision):
    good = png_bytes(generate("attributes", 2**48 + 30).images[0])
    truncated = EncodedImage.probe(good[: len(good) // 2])  # the header still reads: only decoding fails
    client = client_for(mini, [vision.endpoint])
    with pytest.raises(InputError, match="cannot decode"):
        asyncio.run(client.encode(mini.build_prompt("Q", [truncated], decode_images=False)))
    assert client.stats["retries"] == 0 and client.peers[0].down_until == 0.0
    prompt = mini.build_prompt("Q", [EncodedImage.probe(good)], decode_images=False)
    assert asyncio.run(client.encode(prompt)).features is not None
    with pytest.raises(InputError, match="pixels"):
        EncodedImage.probe(good, max_pixels=100)
    with pytest.raises(InputError, match="cannot decode"):
        EncodedImage.probe(b"not an image")
    client.close()


def test_flash_router_runs_remotely_and_only_kept_tokens_travel(mini, vision):
    s = generate("hires", 2**48 + 22)
    prompt = mini.build_prompt(s.question, s.images)
    flash = (0.5, 0.0)
    client = client_for(mini, [vision.endpoint])
    enc = asyncio.run(client.encode(prompt, flash))
    local = LLMEngine(mini).encode(prompt, flash)
    assert enc.input_ids == local.input_ids and len(enc.input_ids) < len(prompt.input_ids)
    assert enc.features.shape == local.features.shape
    assert torch.equal(enc.features.view(torch.int16), local.features.to(torch.bfloat16).view(torch.int16))
    client.close()


def test_malformed_message_is_rejected_and_server_keeps_serving(mini, vision):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(vision.endpoint)
    sock.send_multipart([msgpack.packb({"v": 1, "type": "encode", "id": "bad", "tiles_per_image": [2],
                                        "tensors": [{"dtype": "float32", "shape": [1, 3, 4, 4]}]}),
                         b"\x00" * (3 * 16 * 4)])
    assert sock.poll(5000)
    header, _ = unpack(sock.recv_multipart())
    assert header["type"] == "error" and "float32 tensor" in header["message"]
    sock.close(0)
    ctx.term()
    prompt = mini.build_prompt("What color is the circle?", generate("attributes", 2**48 + 23).images)
    client = client_for(mini, [vision.endpoint])
    assert asyncio.run(client.encode(prompt)).features is not None
    assert vision.server.stats["rejected"] == 1
    client.close()


def test_down_and_slow_servers_fail_over(mini, vision):
    prompt = mini.build_prompt("What color is the circle?", generate("attributes", 2**48 + 24).images)
    dead = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    slow = f"tcp://127.0.0.1:{port}"
    client = client_for(mini, [dead, slow, vision.endpoint], timeout_s=0.5)
    client.peers[2].down_until = time.monotonic() + 60  # make the live server the last resort
    t = time.perf_counter()
    enc = asyncio.run(client.encode(prompt))
    took = time.perf_counter() - t
    assert enc.features is not None and client.stats["retries"] == 2
    assert 0.5 <= took < 5  # one timeout for the slow server; the dead one failed at once
    silent.close(0)
    ctx.term()
    client.close()


def test_restarted_server_is_picked_up_again(mini, vision_model):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    prompt = mini.build_prompt("What color is the circle?", generate("attributes", 2**48 + 25).images)
    client = client_for(mini, [endpoint], timeout_s=2, retry_after_s=0.2)

    async def scenario():
        first = Running(vision_model, endpoint)
        header = {"type": "encode", "tiles_per_image": prompt.tiles_per_image, "flash": None}
        ok = await client.request(header, [prompt.pixel_values])
        first.stop()
        with pytest.raises(VisionUnavailable, match="could encode"):
            await client.request(header, [prompt.pixel_values])
        second = Running(vision_model, endpoint)
        await asyncio.sleep(0.5)  # reconnect and let the down mark expire
        again = await client.request(header, [prompt.pixel_values])
        second.stop()
        return ok, again

    ok, again = asyncio.run(scenario())
    assert torch.equal(ok[0], again[0])
    client.close()


def reference_answer(mini, s, tokens: int) -> str:
    """The coupled engine's greedy answer when fed the same BF16 features a vision server sends."""
    prompt = mini.build_prompt(s.question, s.images)
    with torch.inference_mode():
        feats, _ = mini.model.encode_images(prompt.pixel_values)
    enc = LLMEngine(mini).encode(prompt)
    enc = EncodedPrompt(enc.input_ids, feats.to(torch.bfloat16), enc.spans)
    return mini.tokenizer.decode(LLMEngine(mini).generate([enc], SamplingParams(max_new_tokens=tokens))[0])


def test_openai_server_over_remote_vision(mini, vision):
    lang = internvl35.load("mini", part="language")
    assert all(p.device.type == "meta" for p in lang.model.vision_model.parameters())
    dead = f"tcp://127.0.0.1:{free_port()}"
    with serving(create_app(lang, name="mini", vision=[vision.endpoint])) as port, \
            serving(create_app(lang, name="mini", vision=[dead], vision_timeout_s=0.5)) as down_port:
        s = generate("counting", 2**48 + 26)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="mini", messages=user(s.question, data_url(s.images[0])),
                                           max_tokens=8)
        want = reference_answer(mini, s, 8)
        assert r.choices[0].message.content == want.strip()
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{down_port}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            bad.chat.completions.create(model="mini", messages=user("hi", data_url(s.images[0])), max_tokens=4)
        assert e.value.status_code == 503 and "vision server" in e.value.message
        text_only = bad.chat.completions.create(model="mini", messages=user("What is 2 plus 3?"), max_tokens=4)
        assert text_only.choices[0].finish_reason in ("stop", "length")  # unaffected by the vision outage
        png = png_bytes(s.images[0])
        broken = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
        with pytest.raises(openai.BadRequestError, match="cannot decode"):
            client.chat.completions.create(model="mini", messages=user(s.question, broken), max_tokens=4)
        again = client.chat.completions.create(model="mini", messages=user(s.question, data_url(s.images[0])),
                                               max_tokens=8)
        assert again.choices[0].message.content == want.strip()


def test_images_tiled_on_the_language_side_when_asked(mini, vision):
    """`--preprocess language`: this side decodes and tiles, float32 tiles cross the wire, the
    answer is the same."""
    lang = internvl35.load("mini", part="language")
    s = generate("hires", 2**48 + 27)
    tiles = mini.build_prompt(s.question, s.images).pixel_values
    for side in ("vision", "language"):
        with serving(create_app(lang, name="mini", vision=[vision.endpoint], preprocess=side)) as port:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            r = client.chat.completions.create(model="mini", messages=user(s.question, data_url(s.images[0])),
                                               max_tokens=8)
            assert r.choices[0].message.content == reference_answer(mini, s, 8).strip()
            sent = metric(port, "internvl35_remote_vision_transfer_bytes_total")
            # sent = what went out (the file or the tiles) + the bf16 features that came back
            assert (sent > tiles.numel() * 4) == (side == "language"), (side, sent, tiles.shape)
    with pytest.raises(ValueError, match="preprocess takes one of vision, language"):
        create_app(lang, vision=[vision.endpoint], preprocess="gpu")


def test_language_server_keeps_serving_while_vision_is_slow(mini):
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # a vision server stuck on a long job
    vport = silent.bind_to_random_port("tcp://127.0.0.1")
    lang = internvl35.load("mini", part="language")
    app = create_app(lang, name="mini", vision=[f"tcp://127.0.0.1:{vport}"], vision_timeout_s=3.0)
    with serving(app) as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        done = {}

        def image_request():
            try:
                client.chat.completions.create(model="mini", max_tokens=4, messages=user(
                    "How many?", data_url(generate("counting", 2**48 + 27).images[0])))
            except openai.APIStatusError as e:
                done["image"] = (time.perf_counter(), e.status_code)

        t0 = time.perf_counter()
        th = threading.Thread(target=image_request)
        th.start()
        time.sleep(0.3)
        r = client.chat.completions.create(model="mini", messages=user("What is 2 plus 3?"), max_tokens=4)
        text_done = time.perf_counter()
        th.join()
    silent.close(0)
    ctx.term()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert text_done - t0 < 2.5 and done["image"][1] == 503 and done["image"][0] - t0 >= 3.0


def test_a_slow_decode_does_not_hold_up_other_requests(mini, vision_model, monkeypatch):
    # image files decode on worker threads: a request behind a slow one is encoded without waiting
    server = Running(vision_model, "tcp://127.0.0.1:*")
    real = server.server._tiles

    def slow_tiles(header, files):
        time.sleep(1.5)
        return real(header, files)

    monkeypatch.setattr(server.server, "_tiles", slow_tiles)
    files = [EncodedImage.probe(png_bytes(generate("attributes", 2**48 + 31).images[0]))]
    slow = mini.build_prompt("Q", files, decode_images=False)
    fast = mini.build_prompt("Q", generate("attributes", 2**48 + 32).images)
    client = client_for(mini, [server.endpoint], timeout_s=10)

    async def both():
        done = []

        async def go(name, prompt):
            await client.encode(prompt)
            done.append((name, time.perf_counter()))

        t0 = time.perf_counter()
        slow_task = asyncio.create_task(go("slow", slow))
        await asyncio.sleep(0.2)
        await asyncio.gather(slow_task, go("fast", fast))
        return t0, dict(done), [n for n, _ in done]

    t0, at, order = asyncio.run(both())
    server.stop()
    client.close()
    assert order == ["fast", "slow"] and at["fast"] - t0 < 1.2 and at["slow"] - t0 >= 1.5


def test_a_backlog_is_encoded_in_larger_passes(vision_model, monkeypatch):
    """A pass takes ready requests up to the tile budget; once requests have been left over for
    BACKLOG_S and BACKLOG_PASSES passes' worth are ready, up to that many budgets at once. Requests
    never split and keep their arrival order."""
    from concurrent.futures import Future

    from internvl35.serve import vision_server

    server = VisionServer(vision_model, "tcp://127.0.0.1:*")
    passes = []
    monkeypatch.setattr(server, "_encode", lambda batch: passes.append([b[1]["id"] for b in batch]))
    budget, S = server.max_batch_tiles, vision_model.cfg.vision.image_size
    per_request = 7

    def entry(i: int, done: bool = True):
        job = Future()
        if done:
            job.set_result((torch.zeros(per_request, 3, S, S), None))
        return (b"c", {"id": i}, job)

    try:
        server.queue = [entry(i) for i in range(3)]
        server.step()
        assert passes == [[0, 1]] and [e[1]["id"] for e in server.queue] == [2]
        backlog = vision_server.BACKLOG_PASSES * budget // per_request + 1  # ready tiles above the threshold
        fit = vision_server.BACKLOG_PASSES * budget // per_request
        for since, taken in ((0.0, 2), (vision_server.BACKLOG_S, fit)):  # a fresh backlog; one as old as BACKLOG_S
            server._caught_up = time.monotonic() - since
            server.queue = [entry(0), entry(1), entry(100, done=False)] + [entry(i) for i in range(2, backlog)]
            passes.clear()
            server.step()
            assert passes == [list(range(taken))]
            assert [e[1]["id"] for e in server.queue] == [100] + list(range(taken, backlog))
    finally:
        server.close()
