"""Autoregressive generation with a static KV cache (gpt-fast style): batched prompts with left
padding, streaming, stop tokens. The serving engine (paged cache, continuous batching) is separate."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from internvl35.models.internvl import InternVLModel
from internvl35.models.layers import attention
from internvl35.sampling import SamplingParams, sample_next


class StaticKVCache:
    """Preallocated K/V [layers, B, K, S, Dh]; slots fill left to right, `valid` marks real tokens."""

    def __init__(self, model: InternVLModel, batch: int, max_len: int) -> None:
        t = model.cfg.text
        p = model.language_model.model.embed_tokens.weight
        shape = (t.num_layers, batch, t.num_kv_heads, max_len, t.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=p.device)
        self.length, self._step, self._mask, self._causal = 0, 0, None, False

    def begin(self, valid_new: torch.Tensor) -> None:
        """Declare the next forward's tokens: valid_new [B, L] (False = padding)."""
        s, L = self.length, valid_new.shape[1]
        if s + L > self.valid.shape[1]:
            raise ValueError(f"KV cache holds {self.valid.shape[1]} tokens, {s + L} requested")
        self.valid[:, s:s + L] = valid_new
        self._step = L
        if bool(self.valid[:, :s + L].all()) and (s == 0 or L == 1):
            self._mask, self._causal = None, L > 1  # plain causal attention, no mask tensor needed
            return
        q = torch.arange(s, s + L, device=valid_new.device)[:, None]
        k = torch.arange(s + L, device=valid_new.device)[None, :]
        mask = ((k <= q)[None] & self.valid[:, None, :s + L]) | (k == q)[None]  # [B, L, S]
        self._mask, self._causal = mask[:, None], False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, L = self.length, k.shape[2]
        self.k[layer, :, :, s:s + L] = k
        self.v[layer, :, :, s:s + L] = v
        keys, values = self.k[layer, :, :, :s + L], self.v[layer, :, :, :s + L]
        return attention(q, keys, values, causal=self._causal, mask=self._mask)

    def end(self) -> None:
        self.length += self._step


@torch.inference_mode()
def generate_stream(model: InternVLModel, prompts: list[list[int]], params: SamplingParams,
                    stop_ids: set[int], image_features: torch.Tensor | None = None,
                    pad_id: int = 0) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of each prompt (None once that prompt has stopped).

    `image_features` [M, D] fill the <IMG_CONTEXT> slots of all prompts in order. A stop token is
    yielded, then the row is finished.
    """
    B, Lmax = len(prompts), max(len(p) for p in prompts)
    device = model.language_model.model.embed_tokens.weight.device
    ids = torch.full((B, Lmax), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, Lmax, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, Lmax - len(p):] = torch.tensor(p, device=device)
        valid[i, Lmax - len(p):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache(model, B, Lmax + params.max_new_tokens)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    seen = ids.masked_fill(~valid, ids[valid][0] if valid.any() else 0)  # padding repeats a real id
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache.begin(valid)
    logits = model(ids, image_features=image_features, positions=positions, cache=cache, last_only=True)
    cache.end()
    for _ in range(params.max_new_tokens):
        nxt = sample_next(logits[:, -1], params, gen, seen if params.repetition_penalty != 1.0 else None)
        yield [None if d else int(t) for t, d in zip(nxt.tolist(), done.tolist())]
        done |= torch.tensor([int(t) in stop_ids for t in nxt.tolist()], device=device)
        if bool(done.all()):
            return
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        positions = positions[:, -1:] + 1
        cache.begin(torch.ones(B, 1, dtype=torch.bool, device=device))
        logits = model(nxt[:, None], positions=positions, cache=cache, last_only=True)
        cache.end()
