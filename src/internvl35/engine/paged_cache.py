"""The paged KV cache: one flat pool of slots per layer, addressed through each sequence's block table.

A step's tokens from many sequences (prefill chunks and single decode tokens, mixed) arrive as one
flat row. `attend` writes their K/V into their slots, then attends prefills with nothing cached
over their own rows (several at once, padded to a common length), other prefills each over its
slots, and all decodes together over padded slot lists. This is the one place a GPU varlen /
paged kernel would replace the PyTorch code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl35.models.layers import attention


@dataclass
class FreshGroup:
    """Prefills with nothing cached, attended over their own rows of the step in one call: right-
    padded to the longest, causal masking keeps every real query off the padding (mini, 32
    prompts of 42-111 tokens: one call per layer instead of 32). One sequence is a plain slice."""

    start: int  # one sequence: its rows [start, end)
    end: int
    gather: torch.Tensor | None = None  # several: [P, Lmax] flat rows (padding repeats a last row)
    rows: torch.Tensor | None = None  # [n] flat rows of their tokens
    places: torch.Tensor | None = None  # [n] where those sit in the padded [P * Lmax]


def _fresh_groups(spans: list[tuple[int, int]], device: torch.device) -> list[FreshGroup]:
    """(flat start, length) of fresh prefills -> groups whose lengths are within 2x of each other
    (bounds the padded attention's extra work)."""
    groups: list[list[tuple[int, int]]] = []
    for span in sorted(spans, key=lambda sp: -sp[1]):
        if groups and span[1] * 2 >= groups[-1][0][1]:
            groups[-1].append(span)
        else:
            groups.append([span])
    out = []
    for g in groups:
        if len(g) == 1:
            out.append(FreshGroup(g[0][0], g[0][0] + g[0][1]))
            continue
        width = g[0][1]
        col = torch.arange(width)
        starts, lens = torch.tensor([sp[0] for sp in g]), torch.tensor([sp[1] for sp in g])
        gather = starts[:, None] + torch.minimum(col[None], lens[:, None] - 1)
        real = col[None] < lens[:, None]
        places = torch.arange(len(g) * width).view(len(g), width)[real]
        out.append(FreshGroup(0, 0, gather.to(device), gather[real].to(device), places.to(device)))
    return out


@dataclass
class StepLayout:
    """Where each sequence of a step sits in the flat row and in the cache (built once per step)."""

    slots: torch.Tensor  # [T] cache slot of every new token
    fresh: list[FreshGroup]  # prefills with nothing cached
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # the others: (q start, q end, slots [ctx], mask)
    decode_rows: torch.Tensor | None  # [B] positions of the decode tokens in the flat row
    decode_slots: torch.Tensor | None  # [B, S] slots of each decode sequence's context (padded)
    decode_mask: torch.Tensor | None  # [B, 1, 1, S] True = real key

    @property
    def decode_only(self) -> bool:
        return not (self.fresh or self.prefills)


def build_layout(entries: list[tuple[list[int], int, int]], block_size: int,
                 device: torch.device) -> StepLayout:
    """entries: per sequence (block table, tokens already cached, new tokens), in flat-row order."""
    slots: list[int] = []  # the new tokens' cache slots, in flat-row order
    prefills, fresh, dec_rows, dec_tables, dec_lens = [], [], [], [], []
    row = 0
    for table, cached, new in entries:
        ctx = cached + new
        if new == 1 and cached > 0:
            # a decode: plain ints (one entry per running sequence; tensors per entry cost more),
            # its context slots are built below for all decodes at once
            slots.append(table[cached // block_size] * block_size + cached % block_size)
            dec_rows.append(row)
            dec_tables.append(table)
            dec_lens.append(ctx)
        else:
            all_slots = _slots(torch.tensor(table), block_size, torch.arange(ctx))
            slots += all_slots[cached:].tolist()
            if cached == 0:  # attends over its own rows of the step
                fresh.append((row, new))
            else:  # causal with an offset: query j sees keys <= cached + j
                mask = (torch.arange(ctx)[None, :] <= torch.arange(cached, ctx)[:, None])[None, None]
                prefills.append((row, row + new, all_slots.to(device), mask.to(device)))
        row += new
    layout = StepLayout(torch.tensor(slots, device=device), _fresh_groups(fresh, device), prefills, None, None, None)
    if dec_rows:
        S = max(dec_lens)
        width = -(-S // block_size)
        tables = torch.tensor([(t + [0] * width)[:width] for t in dec_tables])
        lens = torch.tensor(dec_lens)
        layout.decode_rows = torch.tensor(dec_rows, device=device)
        pos = torch.arange(S)
        layout.decode_slots = _slots(tables, block_size, pos).to(device)  # padding: masked
        layout.decode_mask = (pos[None] < lens[:, None])[:, None, None].to(device)
    return layout


def _slots(tables: torch.Tensor, block_size: int, positions: torch.Tensor) -> torch.Tensor:
    """Block tables [..., n] -> the cache slots of `positions` [P]: [..., P]. Gathered afresh, so the
    result has canonical strides even for one row (a compiled step guards on them)."""
    return tables[..., positions // block_size] * block_size + positions % block_size


class PagedKVCache:
    """K/V pools [num_blocks * block_size, K, Dh], one pair per layer; implements `AttentionCache`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        # Separate tensors per layer: a compiled step writing into a slice of one shared tensor would
        # copy the whole tensor.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.layout: StepLayout | None = None

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [1, H, T, Dh], k/v [1, K, T, Dh] for the step's flat row -> [1, H, T, Dh]. Rows past
        the layout's tokens (padding, see ModelRunner) are neither stored nor attended; their
        output is zero."""
        lay = self.layout
        kc, vc = self.k[layer], self.v[layer]
        n = lay.slots.shape[0]
        # index_copy_/index_select rather than tensor[index]: several times faster on CPU
        kc.index_copy_(0, lay.slots, k[0, :, :n].transpose(0, 1))
        vc.index_copy_(0, lay.slots, v[0, :, :n].transpose(0, 1))
        out = torch.empty_like(q)
        out[:, :, n:] = 0
        for g in lay.fresh:
            if g.gather is None:
                rows = slice(g.start, g.end)
                out[:, :, rows] = attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], causal=True)
                continue
            P, width = g.gather.shape
            pq, pk, pv = (t[0].index_select(1, g.gather.view(-1)).unflatten(1, (P, width)).transpose(0, 1)
                          for t in (q, k, v))  # [P, heads, Lmax, Dh]
            o = attention(pq, pk, pv, causal=True).transpose(0, 1).flatten(1, 2)  # [H, P * Lmax, Dh]
            out[0].index_copy_(1, g.rows, o.index_select(1, g.places))
        for start, end, slots, mask in lay.prefills:
            keys = kc.index_select(0, slots).transpose(0, 1)[None]  # [1, K, ctx, Dh]
            values = vc.index_select(0, slots).transpose(0, 1)[None]
            out[:, :, start:end] = attention(q[:, :, start:end], keys, values, causal=False, mask=mask)
        if lay.decode_rows is not None:
            qd = q[0, :, lay.decode_rows].transpose(0, 1)  # [B, H, Dh]
            decode = _decode_op if torch.compiler.is_compiling() else decode_attention
            out[0, :, lay.decode_rows] = decode(qd, kc, vc, lay.decode_slots, lay.decode_mask).transpose(0, 1)
        return out


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """One new token per sequence over its cached context: q [B, H, Dh], pools [N, K, Dh], context
    slots [B, S] (padded; `mask` [B, 1, 1, S] marks the real ones) -> [B, H, Dh]."""
    B, S = slots.shape
    flat = slots.reshape(-1)
    keys = kc.index_select(0, flat).view(B, S, *kc.shape[1:]).permute(0, 2, 1, 3)  # [B, K, S, Dh]
    values = vc.index_select(0, flat).view(B, S, *vc.shape[1:]).permute(0, 2, 1, 3)
    # contiguous, as the operator's fake declares: the kernel's own layout varies (CUDA's SDPA
    # returns a transposed one), and compiled steps read the output by the declared strides
    return attention(q[:, :, None], keys, values, causal=False, mask=mask)[:, :, 0].contiguous()


_decode_op = None  # `decode_attention` as an operator that compiled steps call as is
# Inductor's on-disk cache keys compiled graphs by operator name, not by the fake's code: the suffix
# changes whenever the operator's output layout or shapes change, so graphs compiled against an older
# contract are never replayed (v2: contiguous output; v1's output followed the query's strides).
DECODE_OP = "internvl35::paged_decode_attention_v2"


def register_decode_op() -> None:
    """Make compiled decode steps call `decode_attention` as one opaque operator: inductor's own
    loops for the gather, scores and softmax ran 3x slower than this eager code (mini shapes, 32
    sequences over 128 slots on 2 cores: 1.0-1.4 ms vs 0.34-0.43 ms per layer). Registered before
    the first compile (registration imports torch's custom-op machinery; not needed otherwise)."""
    global _decode_op
    if _decode_op is None:
        _decode_op = torch.library.custom_op(DECODE_OP, mutates_args=())(decode_attention)
        _decode_op.register_fake(lambda q, kc, vc, slots, mask: q.new_empty(q.shape))
