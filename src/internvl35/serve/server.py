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


def create_app(model: str | ChatModel = "mini", engine_config: EngineConfig | None = None,
               limits: ServerLimits = ServerLimits(), name: str | None = None) -> FastAPI:
    chat_model = load(model) if isinstance(model, (str, Path)) else model
    engine = AsyncEngine(LLMEngine(chat_model, engine_config))
    served = name or (chat_model.path.name if chat_model.path else "internvl35")
    app = build_app(chat_model, engine, served, limits)
    app.router.on_shutdown.append(engine.close)
    return app


def run_server(model: str, host: str, port: int, media_dir: Path | None = None, max_images: int = 8,
               kv_cache_mb: int = 512, max_num_seqs: int = 64, log_level: str = "info") -> None:
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = ServerLimits(max_images=max_images, media=MediaLimits(local_dir=media_dir))
    config = EngineConfig(kv_cache_bytes=kv_cache_mb * 2**20, max_num_seqs=max_num_seqs)
    uvicorn.run(create_app(model, config, limits), host=host, port=port, log_level=log_level)
