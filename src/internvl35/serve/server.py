"""Assembles model, engine and API into a running server (`internvl35 serve`)."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI

from internvl35.chat import ChatModel, load
from internvl35.engine.llm_engine import EngineConfig, LLMEngine
from internvl35.serve.async_engine import AsyncEngine
from internvl35.serve.media import MediaLimits
from internvl35.serve.openai_api import ServerLimits, build_app
from internvl35.serve.vision_client import RemoteVision, check_preprocess


def create_app(model: str | ChatModel = "mini", engine_config: EngineConfig | None = None,
               limits: ServerLimits = ServerLimits(), name: str | None = None,
               vision: list[str] = (), vision_timeout_s: float = 30.0, compile: bool = False,
               pack_weights: bool = False, preprocess: str = "vision", device: str = "cpu") -> FastAPI:
    """The OpenAI server; with `vision` endpoints only the LLM is loaded and images go to those
    vision servers (decoupled deployment), decoded and tiled on the side `preprocess` names.
    `compile` decodes through torch.compile, compiled here before the first request;
    `pack_weights` and `device` as in `load`."""
    check_preprocess(preprocess)  # before the model loads
    if isinstance(model, (str, Path)):
        model = load(model, part="language" if vision else "all", compile=compile, pack_weights=pack_weights,
                     device=device)
    llm = LLMEngine(model, engine_config)
    llm.warmup()
    engine = AsyncEngine(llm)
    remote = None
    if vision:
        remote = RemoteVision(list(vision), model.tokenizer.img_context_id, model.cfg.num_image_token,
                              timeout_s=vision_timeout_s, preprocess=preprocess)
    served = name or (model.path.name if model.path else "internvl35")
    app = build_app(model, engine, served, limits, remote)
    app.router.on_shutdown.append(engine.close)
    if remote is not None:
        app.router.on_shutdown.append(remote.close)
    return app


def run_server(model: str, host: str, port: int, media_dir: Path | None = None, max_images: int = 8,
               kv_cache_mb: int = 512, max_num_seqs: int = 64, vision: list[str] = (),
               vision_timeout_s: float = 30.0, threads: int | None = None, name: str | None = None,
               log_level: str = "info", compile: bool = False, pack_weights: bool = False,
               preprocess: str = "vision", device: str = "cpu") -> None:
    import torch
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        torch.set_num_threads(threads)
    limits = ServerLimits(max_images=max_images, media=MediaLimits(local_dir=media_dir))
    config = EngineConfig(kv_cache_bytes=kv_cache_mb * 2**20, max_num_seqs=max_num_seqs)
    app = create_app(model, config, limits, name, vision=vision, vision_timeout_s=vision_timeout_s, compile=compile,
                     pack_weights=pack_weights, preprocess=preprocess, device=device)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
