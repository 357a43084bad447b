"""Runs one scheduled step on the model: flat inputs, image features, paged attention, sampling.

It makes no policy decisions (the scheduler does); it turns [(sequence, new tokens)] into one
forward over a single flat row and returns one sampled token per sequence.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from internvl35.engine.paged_cache import PagedKVCache, build_layout, register_decode_op
from internvl35.engine.sequence import Sequence
from internvl35.models.internvl import InternVLModel
from internvl35.models.cpu_matmul import padded_rows
from internvl35.models.layers import SPLIT_MAX_ROWS, prepare_compile
from internvl35.models.qwen3 import require_weights_as_prepared
from internvl35.sampling import argmax_rows, sample_next

log = logging.getLogger("internvl35.engine")


def _decode_logits(model: InternVLModel, ids: torch.Tensor, positions: torch.Tensor,
                   cache: PagedKVCache) -> torch.Tensor:
    """A step where every sequence adds one token: ids/positions [1, B] -> logits [B, V]."""
    lm = model.language_model
    return lm.logits(lm.model(lm.model.embed_tokens(ids), positions, cache)[0])


@functools.cache
def _compiled_decode_logits() -> Callable:
    """`_decode_logits` as one graph with dynamic batch size and context length: three compiles (one
    sequence, 2..SPLIT_MAX_ROWS or PACKED_MAX_ROWS, more) instead of one per batch size and length.
    The small ops of each layer fuse; the products and the paged attention stay library calls (mini
    on 2 cores: 2.2-4.9 ms per step at 4-18 sequences vs 4.6-6.5 ms eager; at 32, 7.6 ms since the
    attention became one operator, 10.9 ms with inductor's own loops for it)."""
    prepare_compile()
    register_decode_op()
    return torch.compile(_decode_logits, dynamic=True, options={"realize_opcount_threshold": 0})


class ModelRunner:
    def __init__(self, model: InternVLModel, num_blocks: int, block_size: int, compile: bool = False) -> None:
        self.model = model
        if compile:
            require_weights_as_prepared(model)
        if compile and model.cfg.text.moe is not None:
            # expert dispatch has data-dependent shapes: the graph breaks at every layer and dynamo
            # gives up after its recompile limit (correct, slower than eager, noisy)
            log.warning("compiled decoding covers dense LLMs; this MoE model decodes eagerly")
            compile = False
        self.compile = compile  # steps of single new tokens through torch.compile
        t = model.cfg.text
        p = model.language_model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.cache = PagedKVCache(t.num_layers, num_blocks, block_size, t.num_kv_heads, t.head_dim,
                                  p.dtype, p.device)

    def _inputs(self, batch: list[tuple[Sequence, int]], pad: bool = False):
        """Flat ids, positions, image-row flags and image features of a step; with `pad`, the row
        is filled up to a `padded_rows` size with rows that attention ignores (PagedKVCache.attend)
        and nothing reads, so the model's products see a bounded set of shapes (oneDNN builds a
        kernel per shape, 1-5 ms each, and prefill steps bring new token counts all the time)."""
        ids: list[int] = []
        positions: list[int] = []
        image_slots: list[bool] = []
        feats: list[torch.Tensor] = []
        for seq, n in batch:
            start, end = seq.num_computed, seq.num_computed + n
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            inside = [False] * n
            for s in seq.images:
                lo, hi = max(start, s.start) - start, min(end, s.start + s.length) - start
                if hi > lo:
                    inside[lo:hi] = [True] * (hi - lo)
            image_slots += inside
            if seq.features is not None:
                a, b = seq.feature_rows(start, end)
                if b > a:
                    feats.append(seq.features[a:b])
        if pad and len(ids) > SPLIT_MAX_ROWS:  # fewer rows take the products' other paths
            extra = padded_rows(len(ids)) - len(ids)
            ids, positions, image_slots = ids + [0] * extra, positions + [0] * extra, image_slots + [False] * extra
        dev = self.device
        return (torch.tensor(ids, device=dev)[None], torch.tensor(positions, device=dev)[None],
                torch.tensor(image_slots, device=dev), torch.cat(feats).to(dev, self.dtype) if feats else None)

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> list[int]:
        """Compute the new tokens of every sequence; -> the next token of each."""
        entries = [(seq.block_table, seq.num_computed, n) for seq, n in batch]
        self.cache.layout = build_layout(entries, self.block_size, self.device)
        compiled = self.compile and self.cache.layout.decode_only  # every sequence adds one token
        ids, positions, image_slots, feats = self._inputs(batch, pad=not compiled)
        if compiled:
            logits = _compiled_decode_logits()(self.model, ids, positions, self.cache)
        else:
            lm = self.model.language_model
            h = lm.model.embed_tokens(ids)  # [1, T, D]
            if feats is not None:  # image rows are placed by span, not by token id
                h = h.masked_scatter(image_slots[None, :, None], feats)
            h = lm.model(h, positions, self.cache)
            last = torch.tensor([n for _, n in batch], device=self.device).cumsum(0) - 1
            logits = lm.logits(h[0, last])  # [N, V]
        self.cache.layout = None
        return self.sample(logits, [seq for seq, _ in batch])

    @staticmethod
    def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        out = argmax_rows(logits.float()).tolist()  # greedy rows need nothing else
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.greedy and p.repetition_penalty == 1.0:
                continue
            seen = torch.tensor([seq.token_ids], device=logits.device) if p.repetition_penalty != 1.0 else None
            out[i] = int(sample_next(logits[i:i + 1], p, seq.generator, seen)[0])
        return out
