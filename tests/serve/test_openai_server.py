"""A real server on loopback, driven by the real `openai` client and by raw HTTP for bad input."""

from __future__ import annotations

import asyncio
import base64
import http.client
import http.server
import io
import json
import socket
import threading
import time
from contextlib import contextmanager

import openai
import pytest
import uvicorn
from PIL import Image

from internvl35.data.world import generate
from internvl35.serve.media import MediaLimits
from internvl35.serve.openai_api import ServerLimits
from internvl35.serve.server import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


@contextmanager
def serving(app):
    """Run `app` with uvicorn on a free loopback port in a thread; yields the port."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(mini, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    limits = ServerLimits(max_images=3, media=MediaLimits(max_pixels=1_000_000, local_dir=media,
                                                          fetch_timeout_s=2.0))
    with serving(create_app(mini, limits=limits, name="mini")) as port:
        yield {"port": port, "media": media, "base": f"http://127.0.0.1:{port}/v1"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"], api_key="none", max_retries=0)


def post(server, body, path="/v1/chat/completions") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    conn.request("POST", path, body if isinstance(body, (bytes, str)) else json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, data = resp.status, resp.read()
    conn.close()
    return status, json.loads(data)


def metrics_text(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def metric(port: int, name: str) -> float:
    return float(metrics_text(port).split(f"\n{name} ")[1].split()[0])


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def test_chat_matches_model_chat_with_usage(client, mini):
    s = generate("attributes", 2**48 + 11)
    r = client.chat.completions.create(model="mini", messages=user(s.question, data_url(s.images[0])),
                                       max_tokens=8)
    assert r.choices[0].message.content == mini.chat(s.question, s.images, max_new_tokens=8)
    prompt = mini.build_prompt(s.question, s.images)
    assert r.usage.prompt_tokens == len(prompt.input_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == "stop"


def test_streaming_equals_plain_and_reports_usage(client):
    s = generate("counting", 2**48 + 12)
    msgs = user(s.question, data_url(s.images[0]))
    plain = client.chat.completions.create(model="mini", messages=msgs, max_tokens=8)
    chunks = list(client.chat.completions.create(model="mini", messages=msgs, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_seed_stop_and_multi_turn(client, server):
    r = client.chat.completions.create(model="mini", messages=user("What is the opposite of hot?"), n=3,
                                       temperature=1.0, seed=5, max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="mini", messages=user("What is the opposite of hot?"), n=3,
                                           temperature=1.0, seed=5, max_tokens=6)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    s = generate("multi_image", 2**48 + 13)
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            *user("Describe the images.", *map(data_url, s.images)),
            {"role": "assistant", "content": "Shapes."}, *user(s.question)]
    r = client.chat.completions.create(model="mini", messages=msgs, max_tokens=8, stop=["zzz"])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_thinking_separates_reasoning(client):
    s = generate("arithmetic", 2**48 + 14)
    assert s.thinking
    r = client.chat.completions.create(model="mini", messages=user(s.question, data_url(s.images[0])),
                                       max_tokens=80, extra_body={"thinking": True})
    msg = r.choices[0].message
    reasoning = msg.model_extra.get("reasoning_content")
    assert reasoning and "<think>" not in msg.content and "</think>" not in msg.content
    chunks = list(client.chat.completions.create(model="mini", max_tokens=80, stream=True, messages=user(
        s.question, data_url(s.images[0])), extra_body={"chat_template_kwargs": {"enable_thinking": True}}))
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks
                       if c.choices)
    assert streamed.strip() == reasoning.strip()


def test_models_health_metrics(client, server):
    assert [m.id for m in client.models.list().data] == ["mini"]
    conn = http.client.HTTPConnection("127.0.0.1", server["port"])
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    assert "# TYPE internvl35_requests_total counter" in metrics_text(server["port"])
    assert metric(server["port"], "internvl35_generation_tokens_total") > 0


def test_image_sources_local_and_http(client, server, mini):
    img = generate("attributes", 2**48 + 15).images[0]
    (server["media"] / "a.png").write_bytes(png_bytes(img))
    local = client.chat.completions.create(model="mini", max_tokens=6, messages=user(
        "What color is the circle?", f"file://{server['media'] / 'a.png'}"))
    payload = png_bytes(img)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path != "/a.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    remote = client.chat.completions.create(model="mini", max_tokens=6, messages=user(
        "What color is the circle?", f"{url}/a.png"))
    assert local.choices[0].message.content == remote.choices[0].message.content
    status, body = post(server, {"messages": user("What?", f"{url}/missing.png")})
    assert status == 400 and "HTTP 404" in body["error"]["message"]
    httpd.shutdown()


@pytest.mark.parametrize("case", ["json", "model", "not_image", "truncated", "bomb", "too_many", "too_long",
                                  "temperature", "top_p", "n", "max_tokens", "scheme", "outside", "base64",
                                  "no_user", "part"])
def test_bad_input_gets_a_4xx_and_a_message(server, case):
    good = data_url(Image.new("RGB", (64, 64), (200, 0, 0)))
    png = png_bytes(Image.new("RGB", (64, 64), (200, 0, 0)))
    bodies = {
        "json": b'{"messages": [',
        "model": {"model": "gpt-5", "messages": user("hi")},
        "not_image": {"messages": user("hi", "data:image/png;base64," + base64.b64encode(b"hello").decode())},
        "truncated": {"messages": user("hi", "data:image/png;base64," + base64.b64encode(png[:60]).decode())},
        "bomb": {"messages": user("hi", data_url(Image.new("RGB", (1200, 1000))))},
        "too_many": {"messages": user("hi", good, good, good, good)},
        "too_long": {"messages": user("word " * 5000)},
        "temperature": {"messages": user("hi"), "temperature": -1},
        "top_p": {"messages": user("hi"), "top_p": 0},
        "n": {"messages": user("hi"), "n": 0},
        "max_tokens": {"messages": user("hi"), "max_tokens": 0},
        "scheme": {"messages": user("hi", "ftp://example.com/a.png")},
        "outside": {"messages": user("hi", "file:///etc/hostname")},
        "base64": {"messages": user("hi", "data:image/png;base64,@@@")},
        "no_user": {"messages": [{"role": "assistant", "content": "hi"}]},
        "part": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    }
    status, body = post(server, bodies[case])
    expected = 404 if case == "model" else 400
    assert status == expected, body
    assert body["error"]["message"] and body["error"]["type"]


def test_disconnect_mid_stream_aborts_and_server_keeps_serving(server, client):
    sock = socket.create_connection(("127.0.0.1", server["port"]))
    body = json.dumps({"messages": user("Describe the image in detail."), "max_tokens": 2000,
                       "temperature": 1.0, "seed": 1, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        m = metrics_text(server["port"])
        if "internvl35_requests_running 0" in m and "internvl35_requests_aborted 0" not in m:
            break
        time.sleep(0.2)
    assert "internvl35_requests_running 0" in m and "internvl35_requests_aborted 0" not in m
    r = client.chat.completions.create(model="mini", messages=user("What is the opposite of up?"), max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_64_concurrent_clients_all_complete(server):
    imgs = [data_url(generate("counting", 2**48 + 100 + i).images[0]) for i in range(8)]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server["base"], api_key="none", max_retries=0, timeout=300)
        tasks = [aclient.chat.completions.create(model="mini", max_tokens=6, messages=user(
            "How many circles are there?", imgs[i % 8])) for i in range(64)]
        out = await asyncio.gather(*tasks)
        await aclient.close()
        return out

    results = asyncio.run(run())
    assert len(results) == 64 and all(r.choices[0].finish_reason in ("stop", "length") for r in results)
