"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions (plain and SSE streaming),
/v1/models, /health, /metrics. Every bad input becomes an OpenAI-style error JSON with a 4xx code;
nothing a client sends can stop the engine or other requests."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from internvl35.chat import ChatModel, Prompt
from internvl35.errors import InputError
from internvl35.sampling import SamplingParams
from internvl35.serve.async_engine import AsyncEngine
from internvl35.serve.media import MediaLimits, fetch_encoded, fetch_image
from internvl35.serve.protocol import ChatCompletionRequest, split_messages
from internvl35.serve.vision_client import RemoteVision, VisionUnavailable
from internvl35.data.template import split_reasoning


@dataclass(frozen=True)
class ServerLimits:
    max_images: int = 8
    media: MediaLimits = MediaLimits()


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind,
                                                               "param": param, "code": None}})


def build_app(chat_model: ChatModel, engine: AsyncEngine, model_name: str,
              limits: ServerLimits = ServerLimits(), vision: RemoteVision | None = None) -> FastAPI:
    """`vision` set: images are encoded by remote vision servers (decoupled deployment) while the
    engine keeps decoding; otherwise the engine encodes them itself."""
    app = FastAPI(title="internvl35", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(400, "request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where}: {first.get('msg', 'invalid value')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "internvl35"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine, vision))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.model not in (None, model_name):
            return error(404, f"model {req.model!r} does not exist; this server serves {model_name!r}",
                         "model", "not_found_error")
        try:
            # decoupled: images stay undecoded here unless this side was chosen to decode and tile them
            decode = vision is None or vision.preprocess == "language"
            prompt = await run_in_threadpool(make_prompt, chat_model, req, limits, decode)
            params = SamplingParams(max_new_tokens=req.max_completion_tokens or req.max_tokens or 256,
                                    temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                    repetition_penalty=req.repetition_penalty, seed=req.seed,
                                    ignore_eos=req.ignore_eos)
            flash = chat_model.flash_settings(req.flash, req.flash_relative_threshold, req.flash_absolute_threshold)
        except InputError as e:
            return error(400, str(e))
        if vision is not None:
            try:
                prompt = await vision.encode(prompt, flash)
            except VisionUnavailable as e:
                return error(503, str(e), kind="service_unavailable")
            except InputError as e:
                return error(400, str(e))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = engine.generate(rid, prompt, params, tuple(req.stop or ()), req.n, flash)
        meta = {"id": rid, "created": int(time.time()), "model": model_name}
        try:
            if req.stream:  # input errors found by the engine (e.g. too long) are a 400, not mid-stream
                first = await anext(gen)
                return StreamingResponse(sse(first, gen, meta, req), media_type="text/event-stream")
            return await complete(gen, meta, req)
        except InputError as e:
            return error(400, str(e))
        except Exception as e:  # noqa: BLE001 - an engine failure fails this request only
            return error(500, f"generation failed: {e}", kind="server_error")

    return app


def make_prompt(chat_model: ChatModel, req: ChatCompletionRequest, limits: ServerLimits,
                decode: bool = True) -> Prompt:
    system, history, question, urls = split_messages(req.messages)
    if len(urls) > limits.max_images:
        raise InputError(f"{len(urls)} images in the request; this server accepts at most {limits.max_images}")
    images = [(fetch_image if decode else fetch_encoded)(u, limits.media) for u in urls]
    return chat_model.build_prompt(question, images, history=history, thinking=req.wants_thinking,
                                   system=system, max_tiles=req.max_tiles, decode_images=decode)


def _message(text: str, thinking: bool) -> dict:
    if not thinking:
        return {"role": "assistant", "content": text.strip()}
    reasoning, answer = split_reasoning(text)
    return {"role": "assistant", "content": answer.strip(), "reasoning_content": reasoning}


async def complete(gen, meta: dict, req: ChatCompletionRequest) -> dict:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    prompt_tokens = completion = 0
    async for out in gen:
        texts[out.index] = texts.get(out.index, "") + out.text
        if out.finished:
            reasons[out.index] = out.finish_reason
            prompt_tokens = out.num_prompt_tokens
            completion += out.num_completion_tokens
    choices = [{"index": i, "message": _message(texts.get(i, ""), req.wants_thinking),
                "finish_reason": reasons.get(i), "logprobs": None} for i in range(req.n)]
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


async def sse(first, gen, meta: dict, req: ChatCompletionRequest):
    """Server-sent events in OpenAI's chunk format; thinking text streams as `reasoning_content`."""
    def chunk(choices: list, usage: dict | None = None) -> str:
        body = {**meta, "object": "chat.completion.chunk", "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    texts = {i: "" for i in range(req.n)}
    sent = {i: ("", "") for i in range(req.n)}
    for i in range(req.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    prompt_tokens = completion = 0

    async def outputs():
        yield first
        async for o in gen:
            yield o

    try:
        async for out in outputs():
            for piece in _events(out, texts, sent, req, chunk):
                yield piece
            if out.finished:
                prompt_tokens, completion = out.num_prompt_tokens, completion + out.num_completion_tokens
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band, then end
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    if req.stream_options and req.stream_options.include_usage:
        yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion})
    yield "data: [DONE]\n\n"


def _events(out, texts: dict, sent: dict, req: ChatCompletionRequest, chunk):
    """The SSE chunks for one engine output (none when it only held text back)."""
    texts[out.index] += out.text
    delta: dict = {}
    if req.wants_thinking:
        reasoning, answer = split_reasoning(texts[out.index], partial=not out.finished)
        r0, a0 = sent[out.index]
        if reasoning[len(r0):]:
            delta["reasoning_content"] = reasoning[len(r0):]
        if answer[len(a0):]:
            delta["content"] = answer[len(a0):]
        sent[out.index] = (reasoning, answer)
    elif out.text:
        delta["content"] = out.text
    if delta or out.finished:
        yield chunk([{"index": out.index, "delta": delta,
                      "finish_reason": out.finish_reason if out.finished else None}])


def prometheus_text(engine: AsyncEngine, vision: RemoteVision | None = None) -> str:
    e = engine.engine
    counters = {**{f"internvl35_{k}": v for k, v in engine.counters.items()},
                "internvl35_prompt_tokens_total": e.stats["prompt_tokens"],
                "internvl35_cached_prompt_tokens_total": e.stats["cached_prompt_tokens"],
                "internvl35_generation_tokens_total": e.stats["generation_tokens"],
                "internvl35_engine_steps_total": e.stats["steps"],
                "internvl35_engine_busy_seconds_total": round(engine.busy_s, 3),
                "internvl35_preemptions_total": e.scheduler.num_preemptions,
                "internvl35_vision_cache_hits_total": e.features.hits,
                "internvl35_vision_cache_misses_total": e.features.misses}
    if vision is not None:
        counters.update({f"internvl35_remote_vision_{k}_total": v for k, v in vision.stats.items()})
        counters["internvl35_vision_cache_hits_total"] = vision.features.hits
        counters["internvl35_vision_cache_misses_total"] = vision.features.misses
    gauges = {"internvl35_requests_running": engine.num_running,
              "internvl35_requests_waiting": engine.num_waiting,
              "internvl35_kv_blocks_free": e.block_manager.num_free,
              "internvl35_kv_blocks_total": e.num_blocks,
              "internvl35_vision_cache_bytes": e.features.bytes}
    lines = []
    for kind, items in (("counter", counters), ("gauge", gauges)):
        for name, value in items.items():
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
