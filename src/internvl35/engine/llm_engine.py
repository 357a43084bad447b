"""The engine: requests in, tokens out. Vision encoding (with the feature cache), scheduling,
model steps and output processing (detokenising, stop strings, finish reasons).

Single-threaded by design: `step()` does one scheduling round and one forward. The server drives it
from one background thread (`internvl35.serve.async_engine`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from internvl35.chat import ChatModel, Prompt
from internvl35.engine.block_manager import BlockManager
from internvl35.engine.detokenizer import IncrementalDecoder
from internvl35.engine.mm_cache import EncodedPrompt, FeatureCache, PendingImages, share_duplicates
from internvl35.engine.model_runner import ModelRunner
from internvl35.engine.paged_cache import PagedKVCache
from internvl35.engine.scheduler import Scheduler
from internvl35.engine.sequence import Sequence
from internvl35.errors import InputError
from internvl35.models.layers import PACKED_MAX_ROWS, SPLIT_MAX_ROWS
from internvl35.sampling import SamplingParams


@dataclass
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 512 * 2**20
    num_blocks: int | None = None  # overrides kv_cache_bytes (tests use it to force preemption)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    vision_cache_bytes: int = 256 * 2**20
    max_vision_tiles: int = 64  # tiles per ViT pass when several requests are encoded together


@dataclass
class RequestOutput:
    """What one step produced for one sequence (`index` tells the n choices of a request apart)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str  # new text since the previous output
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0


class LLMEngine:
    def __init__(self, chat_model: ChatModel, config: EngineConfig | None = None) -> None:
        self.chat_model, self.model, self.tokenizer = chat_model, chat_model.model, chat_model.tokenizer
        self.config = cfg = config or EngineConfig()
        t = self.model.cfg.text
        per_block = PagedKVCache.bytes_per_block(t.num_layers, cfg.block_size, t.num_kv_heads, t.head_dim,
                                                 chat_model.dtype)
        self.num_blocks = cfg.num_blocks or max(1, cfg.kv_cache_bytes // per_block)
        self.block_manager = BlockManager(self.num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.num_blocks, cfg.block_size, chat_model.compile)
        self.features = FeatureCache(cfg.vision_cache_bytes)
        self.stop_ids = chat_model.stop_ids
        self.max_len = t.max_position_embeddings
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "cached_prompt_tokens": 0,
                      "requests_finished": 0, "steps": 0}

    # --- vision side -----------------------------------------------------------------------------
    def encode(self, prompt: Prompt, flash: tuple[float, float] | None = None) -> EncodedPrompt:
        """Image features for a prompt, from the feature cache where possible; with Flash the router
        decides per request (its quantile spans the request's tiles), so the request is one unit."""
        out = self.encode_batch([(prompt, flash)])[0]
        if isinstance(out, Exception):
            raise out
        return out

    @torch.inference_mode()
    def encode_batch(self, items: list[tuple[Prompt | EncodedPrompt, tuple[float, float] | None]]
                     ) -> list[EncodedPrompt | Exception]:
        """`encode` for several prompts, their missing images in shared ViT passes (up to
        `max_vision_tiles` tiles each); a prompt whose images cannot be decoded gets its error
        (whatever it is: the requests that arrived with it, one per server client, go on)."""
        out: list[EncodedPrompt | Exception | None] = [None] * len(items)
        pending: list[tuple[int, PendingImages]] = []
        for i, (prompt, flash) in enumerate(items):
            if isinstance(prompt, EncodedPrompt):  # encoded elsewhere (a vision server)
                out[i] = prompt
                continue
            try:
                prompt = self.chat_model.decoded(prompt)
            except Exception as e:  # noqa: BLE001 - one prompt's bad image must not fail the others
                out[i] = e
                continue
            if prompt.pixel_values is None:
                out[i] = EncodedPrompt(list(prompt.input_ids), None)
            else:
                pending.append((i, PendingImages.lookup(self.features, prompt, flash)))
        copies = share_duplicates([p for _, p in pending])
        todo = [p for _, p in pending if p.todo]
        dev = self.chat_model.device, self.chat_model.dtype
        for part in _groups([sum(p.tiles_per_image) for p in todo], self.config.max_vision_tiles):
            encoded = self.model.encode_requests([p.pixels().to(*dev) for p in todo[part]],
                                                 [p.flash for p in todo[part]])
            for p, (feats, per_tile) in zip(todo[part], encoded):
                p.fill(self.features, feats, per_tile)
        for p, i, src, j in copies:
            p.got[i] = src.got[j]
        self.features.hits += len(copies)  # served without encoding, like a cache hit
        for i, p in pending:
            out[i] = p.assemble(self.tokenizer.img_context_id, self.model.cfg.num_image_token)
        return out

    # --- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt | EncodedPrompt, params: SamplingParams,
                    stop: tuple[str, ...] = (), n: int = 1, flash: tuple[float, float] | None = None) -> None:
        """Queue a request (n independent samples of it). Raises InputError if it cannot fit."""
        enc = prompt if isinstance(prompt, EncodedPrompt) else self.encode(prompt, flash)
        total = len(enc.input_ids) + params.max_new_tokens
        if total > self.max_len:
            raise InputError(f"prompt ({len(enc.input_ids)} tokens) + max_tokens ({params.max_new_tokens}) = "
                             f"{total} exceeds the model's context of {self.max_len} tokens")
        if (total + self.config.block_size - 1) // self.config.block_size > self.num_blocks:
            raise InputError(f"request needs {total} tokens of KV cache, the engine holds "
                             f"{self.num_blocks * self.config.block_size}")
        for i in range(n):
            p = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            self.scheduler.add(Sequence(list(enc.input_ids), p, list(enc.spans), enc.features, tuple(stop),
                                        request_id, index=i, decoder=IncrementalDecoder(self.tokenizer)))
        self.stats["prompt_tokens"] += n * len(enc.input_ids)

    def abort(self, request_id: str) -> bool:
        return bool(self.scheduler.abort(request_id))

    def has_unfinished(self) -> bool:
        return len(self.scheduler) > 0

    # --- stepping --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        for seq, n in batch:
            if n > 1 or seq.num_computed == 0:
                self.stats["cached_prompt_tokens"] += seq.num_cached_tokens
        tokens = self.runner.run(batch)
        self.stats["steps"] += 1
        return [self._process(seq, n, tok) for (seq, n), tok in zip(batch, tokens)]

    def _process(self, seq: Sequence, n: int, tok: int) -> RequestOutput:
        seq.num_computed += n
        seq.token_ids.append(tok)
        self.stats["generation_tokens"] += 1
        reason = None
        if tok in self.stop_ids and not seq.params.ignore_eos:
            reason = "stop"
        before = len(seq.decoder.text)
        if tok not in self.stop_ids:
            seq.decoder.add(tok)
        if reason is None and (len(seq.completion_ids) >= seq.params.max_new_tokens or len(seq) >= self.max_len):
            reason = "length"
        text = seq.decoder.flush() if reason is not None else seq.decoder.text
        for s in seq.stop:  # only text added this step can complete a stop string
            cut = text.find(s, max(0, before - len(s) + 1))
            if cut >= 0:
                text, reason = text[:cut], "stop"
        if reason is None:  # hold back anything that may begin a stop string
            keep = len(text)
            for s in seq.stop:
                keep = min([keep] + [len(text) - k for k in range(1, len(s)) if text.endswith(s[:k])])
            text = text[:keep]
        delta = text[len(seq.text):]
        if delta:
            seq.text = text
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.stats["requests_finished"] += 1
        return RequestOutput(seq.request_id, seq.index, [tok], delta, reason is not None, reason,
                             seq.num_prompt_tokens, len(seq.completion_ids))

    def warmup(self) -> None:
        """Compile the decode-step graphs before serving when the model decodes through torch.compile:
        one per range of batch sizes that `linear` treats alike (1; 2..SPLIT_MAX_ROWS or, with packed
        weights, 2..PACKED_MAX_ROWS; beyond), dynamic shapes covering the sizes within each, so no
        request waits for the compiler. A no-op otherwise."""
        if not self.runner.compile:
            return
        stats = dict(self.stats)
        prompt = self.chat_model.build_prompt("Hello.")
        for n in (1, 2, SPLIT_MAX_ROWS + 1, PACKED_MAX_ROWS + 1):  # sizes in one range reuse its graph
            if n <= self.config.max_num_seqs:
                self.generate([prompt] * n, SamplingParams(max_new_tokens=3, ignore_eos=True))
        self.stats = stats

    def generate(self, prompts: list[Prompt | EncodedPrompt],
                 params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion (all submitted at once); -> completion ids without stop tokens."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        for i, (enc, sp) in enumerate(zip(self.encode_batch([(p, None) for p in prompts]), plist)):
            if isinstance(enc, Exception):
                raise enc
            self.add_request(str(i), enc, sp)
        out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        while self.has_unfinished():
            for o in self.step():
                out[o.request_id] += [t for t in o.token_ids if t not in self.stop_ids]
        return [out[str(i)] for i in range(len(prompts))]


def _groups(sizes: list[int], cap: int) -> Iterator[slice]:
    """Consecutive slices whose sizes sum to at most `cap` (an item larger than `cap` goes alone)."""
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > cap:
            yield slice(start, i)
            start, total = i, 0
        total += n
    if start < len(sizes):
        yield slice(start, len(sizes))
