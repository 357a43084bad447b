"""Autoregressive generation with a static KV cache (gpt-fast style): batched prompts with left
padding, streaming, stop tokens. The serving engine (paged cache, continuous batching) is separate."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

from internvl35.kernels.decode import NativeDecoder
from internvl35.models.internvl import InternVLModel
from internvl35.models.layers import attention, prepare_compile
from internvl35.models.qwen3 import require_weights_as_prepared
from internvl35.sampling import SamplingParams, sample_next


class StaticKVCache:
    """Preallocated K [B, K, S, Dh] and V^T [B, K, Dh, S] (V [B, K, S, Dh] with `v_transposed=False`,
    as the native step reads it) per layer; slots fill left to right, `valid` marks real tokens.
    Eager steps attend over the filled prefix; a compiled decode step (static shapes) attends over
    every slot with the unfilled ones masked. A symbolic span over the filled slots (rounded up to
    64) measured no faster for 1B: one graph over 320 vs all 512 slots, 0.691 vs 0.698 of the
    bound, 6 alternating rounds; the weights' matvecs dominate the step."""

    def __init__(self, model: InternVLModel, batch: int, max_len: int, v_transposed: bool = True) -> None:
        t = model.cfg.text
        p = model.language_model.model.embed_tokens.weight
        shape = (batch, t.num_kv_heads, max_len, t.head_dim)
        # Separate tensors per layer: a compiled step writing into one slice of a shared tensor
        # would copy the whole tensor. V is stored transposed, [B, K, Dh, S]: a decode step's
        # probs @ v then reads contiguous rows (see _single_query_attention). Writes go to that
        # tensor itself: inductor updates a strided view of it out of place, copying it whole.
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(t.num_layers)]
        v_shape = (batch, t.num_kv_heads, t.head_dim, max_len) if v_transposed else shape
        self.v = [torch.zeros(v_shape, dtype=p.dtype, device=p.device) for _ in range(t.num_layers)]
        self.v_transposed = v_transposed
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=p.device)
        self.length, self._step, self._mask, self._causal = 0, 0, None, False
        self._slots = torch.zeros(0, dtype=torch.long, device=p.device)
        self._slot_mask = self.valid[:, None, None, :]  # a view: the compiled step's mask, filled slots

    def begin(self, valid_new: torch.Tensor) -> None:
        """Declare the next forward's tokens: valid_new [B, L] (False = padding)."""
        s, L = self.length, valid_new.shape[1]
        if s + L > self.valid.shape[1]:
            raise ValueError(f"KV cache holds {self.valid.shape[1]} tokens, {s + L} requested")
        self.valid[:, s:s + L] = valid_new
        self._step = L
        self._slots = torch.arange(s, s + L, device=valid_new.device)
        if bool(self.valid[:, :s + L].all()) and (s == 0 or L == 1):
            self._mask, self._causal = None, L > 1  # plain causal attention, no mask tensor needed
            return
        q = torch.arange(s, s + L, device=valid_new.device)[:, None]
        k = torch.arange(s + L, device=valid_new.device)[None, :]
        mask = ((k <= q)[None] & self.valid[:, None, :s + L]) | (k == q)[None]  # [B, L, S]
        self._mask, self._causal = mask[:, None], False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(2, self._slots, k)
        if self.v_transposed:
            values.index_copy_(3, self._slots, v.transpose(-1, -2))
            values = values.transpose(-1, -2)
        else:
            values.index_copy_(2, self._slots, v)
        if torch.compiler.is_compiling():  # one token per row; every slot, so shapes never change
            return attention(q, keys, values, causal=False, mask=self._slot_mask)
        n = self.length + self._step
        return attention(q, keys[:, :, :n], values[:, :, :n], causal=self._causal, mask=self._mask)

    def end(self) -> None:
        self.length += self._step


def _decode_step(model: InternVLModel, ids: torch.Tensor, positions: torch.Tensor,
                 cache: StaticKVCache) -> torch.Tensor:
    return model(ids, positions=positions, cache=cache, last_only=True)


@functools.cache
def _compiled_decode_step() -> Callable:
    """gpt-fast style: the whole one-token step as one graph. Inductor's matvec loops stream the
    weights as fast as the eager split; the gain is the ~70 small ops per layer fused into a few
    kernels (1B on 2 cores: 60% -> 69% of the bandwidth bound). Built on first use: importing the
    compiler takes seconds that commands without `--compile` should not pay."""
    prepare_compile()
    # Materialise every intermediate: by default inductor inlines a norm into the matvec that reads
    # it, recomputing it (a scalar rsqrt included) for each of the weight's rows; written once, each
    # matvec loop only streams its weight (1B on 2 cores: 2.14 vs 2.35 ms per layer, 22.4 vs 25.1 ms
    # for the head; 71.8% vs 68.8% of the bandwidth bound, medians of 6 alternating rounds).
    # Inductor's C++ wrapper (`cpp_wrapper`) is left off: it saves 0.35 ms per step (a 28-layer graph
    # of tiny width: 1.19 vs 1.55 ms), about 1 point of the 1B bound, but compiles 1B's step in 129
    # instead of 77 s.
    return torch.compile(_decode_step, dynamic=False, options={"realize_opcount_threshold": 0})


CACHE_BUCKET = 256  # compiled steps round the cache length up to this, so prompts share graphs


@torch.inference_mode()
def generate_stream(model: InternVLModel, prompts: list[list[int]], params: SamplingParams,
                    stop_ids: set[int], image_features: torch.Tensor | None = None,
                    pad_id: int = 0, compile: bool = False, native: bool = True) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each prompt (None once that prompt has stopped).

    `image_features` [M, D] fill the <IMG_CONTEXT> slots of all prompts in order. A stop token is
    yielded, then the row is finished. `compile` runs the decode steps through torch.compile (the
    first call per batch size and cache bucket compiles; the prefill stays eager). With `native`, a
    single prompt decodes through the C step of `internvl35.kernels` where it applies (see
    `NativeDecoder`), compiled or not: one parallel region per step instead of hundreds of small
    parallel loops (1B on 2 cores, bf16 copies, fast memory regime: 0.83-0.85 of the bandwidth bound,
    the compiled step 0.68-0.70 in the same rounds).
    """
    B, Lmax = len(prompts), max(len(p) for p in prompts)
    device = model.language_model.model.embed_tokens.weight.device
    ids = torch.full((B, Lmax), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, Lmax, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, Lmax - len(p):] = torch.tensor(p, device=device)
        valid[i, Lmax - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    max_len = Lmax + params.max_new_tokens
    if compile:
        require_weights_as_prepared(model)
        max_len = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
    use_native = native and B == 1 and NativeDecoder.applies(model)
    step_fn = _compiled_decode_step() if compile and not use_native else _decode_step
    cache = StaticKVCache(model, B, max_len, v_transposed=not use_native)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    seen = ids.masked_fill(~valid, ids[valid][0] if valid.any() else 0)  # padding repeats a real id
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache.begin(valid)
    logits = model(ids, image_features=image_features, positions=positions, cache=cache, last_only=True)
    cache.end()
    if use_native:
        yield from _native_decode(NativeDecoder(model, cache), logits[0, -1], cache.length, params, stop_ids, gen,
                                  seen)
        return
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits[:, -1], params, gen, seen if params.repetition_penalty != 1.0 else None)
        yield [None if d else int(t) for t, d in zip(nxt.tolist(), done.tolist())]
        done |= torch.tensor([int(t) in stop_ids for t in nxt.tolist()], device=device)
        if bool(done.all()):
            return
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        cache.begin(torch.ones(B, 1, dtype=torch.bool, device=device))
        # The first compiled step of this generation passes dynamo's guards (4984 checks for 1B);
        # every later one runs the same graph on the same model, cache and shapes (only tensor values
        # change), so only the checks that tell cached graphs apart run (1B on 2 cores: dynamo's
        # cache lookup 0.62-0.65 instead of 1.16-1.28 ms of a 27-45 ms step).
        later = compile and step > 0
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True) if later else contextlib.nullcontext():
            logits = step_fn(model, nxt[:, None], positions, cache)
        cache.end()


def _native_decode(step: NativeDecoder, logits: torch.Tensor, slot: int, params: SamplingParams,
                   stop_ids: set[int], gen: torch.Generator | None, seen: torch.Tensor) -> Iterator[list[int]]:
    """generate_stream's loop for one unpadded prompt through the C step, from the prefill's last
    logits [V] and the first free cache slot (= the next position). Greedy steps take the kernel's
    argmax and run no torch op: right after a step has streamed the weights through the caches,
    every torch op is cold (1B on 2 cores: a blocked argmax took 400 instead of 66-77 us, the cache's
    slot bookkeeping 180 us, together 0.8-1.0 ms of a 23-32 ms step)."""
    penalty = params.repetition_penalty != 1.0
    greedy = params.greedy and not penalty
    nxt = int(sample_next(logits[None], params, gen, seen if penalty else None)[0])
    for i in range(params.max_new_tokens):
        yield [nxt]
        if nxt in stop_ids or i + 1 == params.max_new_tokens:
            return
        if penalty:
            seen = torch.cat([seen, torch.tensor([[nxt]])], dim=1)
        logits, best = step(nxt, slot)
        slot += 1
        nxt = best if greedy else int(sample_next(logits[None], params, gen, seen if penalty else None)[0])
