"""OpenAI chat-completions request schema (with a few InternVL extensions) and the mapping from
messages to the template's (system, history, question, images)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from internvl35.data.template import IMAGE_PLACEHOLDER, image_prefix
from internvl35.errors import InputError


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # greedy unless asked: the model's default
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # InternVL extensions
    thinking: bool = False
    chat_template_kwargs: dict | None = None  # {"enable_thinking": true}, as other servers accept
    max_tiles: int | None = Field(default=None, ge=1, le=40)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    flash: bool | None = None
    flash_relative_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    flash_absolute_threshold: float | None = Field(default=None, ge=0.0, le=1.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def wants_thinking(self) -> bool:
        return self.thinking or bool((self.chat_template_kwargs or {}).get("enable_thinking"))


def _text_and_images(msg: Message) -> tuple[str, list[str]]:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or "", []
    texts, images = [], []
    for part in msg.content:
        if part.type == "text":
            texts.append(part.text or "")
        elif part.image_url is None:
            raise InputError("an image_url content part needs an image_url object with a url")
        else:
            images.append(part.image_url.url)
    return "\n".join(texts), images


def split_messages(messages: list[Message]) -> tuple[str | None, list[tuple[str, str]], str, list[str]]:
    """-> (system, history [(user, assistant)], question, image urls in order). Images of earlier
    turns get placeholder lines in their own turn; images of the last turn are placed by the template."""
    system = [(_text_and_images(m)[0]) for m in messages if m.role in ("system", "developer")]
    turns = [m for m in messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise InputError("messages must end with a user message")
    parts = [_text_and_images(m) for m in turns]
    # images in earlier turns are placed in their own turn (then every turn places its images);
    # images only in the last turn are placed by the template, exactly as `chat` does
    place_all = any(imgs for (_, imgs), m in zip(parts[:-1], turns) if m.role == "user")
    history: list[tuple[str, str]] = []
    urls: list[str] = []
    pending: str | None = None
    for m, (text, imgs) in zip(turns, parts):
        if m.role == "assistant":
            if imgs:
                raise InputError("assistant messages cannot contain images")
            if pending is None:
                raise InputError("an assistant message must follow a user message")
            history.append((pending, text))
            pending = None
            continue
        if imgs and place_all and IMAGE_PLACEHOLDER not in text:
            text = image_prefix(len(imgs)) + text
        if pending is not None:  # two user messages in a row: one turn
            text = pending + "\n" + text
        urls += imgs
        pending = text
    return ("\n".join(system) if system else None), history, pending or "", urls
