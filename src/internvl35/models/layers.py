"""Shared layers: RMSNorm, rotary embeddings and the single attention entry point.

Every attention in the package (ViT, LLM prefill, LLM decode) goes through `attention()`, so a GPU
kernel (flash-attn varlen, paged decode) is plugged in at one place.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from internvl35.models.cpu_matmul import onednn_faster, onednn_product
from internvl35.models.weight_copies import (Bf16Weight, PackedWeight, WeightCopy, current_copy, onednn_linear,
                                             packed_op)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, head_dim] for integer positions [B, L] (rotate-half convention)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [B, L, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, Dh]; cos/sin [B, L, Dh]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, L, Dh], k/v [B, K, S, Dh] (K divides H) -> [B, H, L, Dh].

    `mask` is boolean [B, 1, L, S] (True = attend) and replaces `causal` when given. `v` may be the
    transposed view of a [B, K, Dh, S] tensor (StaticKVCache keeps V so, for its decode steps).
    """
    gqa = q.shape[1] != k.shape[1]
    v_transposed = _is_transposed(v)
    if q.shape[2] == 1 and (v_transposed or (mask is not None and torch.compiler.is_compiling())):
        return _single_query_attention(q, k, v, mask)
    if v_transposed:  # SDPA's CPU kernel reads it 2.4x slower than a copy (1B layer, 456 tokens)
        v = v.contiguous()
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] > 1, enable_gqa=gqa)


def _is_transposed(v: torch.Tensor) -> bool:
    """Whether `v` is the transposed view of a [..., Dh, S] tensor (its S axis is the contiguous one)."""
    return v.stride(-1) != 1 and v.stride(-2) == 1


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row, for decode steps (the CPU SDPA kernel with a mask took 570 us per 1B
    layer over 512 slots, and reads a transposed v slowly).

    Compiled, with v stored transposed ([B, K, Dh, S] underneath), both products are sums over a
    contiguous last axis, one per query head of a kv group: inductor fuses them with the mask and
    softmax into the layer's own loops, so a 1B step runs 3 kernels instead of 60 kernels and 59 bmm
    calls (2 cores, 8 alternating runs: 85.0 vs 88.4 ms per step; its Python wrapper 2.3 vs 4.4 ms).
    Otherwise two matmuls that read the cache as their left operand, row by row, the one layout MKL
    streams fast for a few columns: over 28 1B layers and 512 slots, k @ q^T 14.6 ms vs q @ k^T
    18.4; v^T @ probs^T 1.9-2.0 ms vs probs @ v 4.7-5.1 (and 16-17 when v^T is a transposed view)."""
    B, H, _, D = q.shape
    K = k.shape[1]
    G = H // K  # q head h uses kv head h // G
    qg = q.reshape(B, K, G, D)
    v_transposed = _is_transposed(v)
    sums = v_transposed and torch.compiler.is_compiling()
    if sums:
        scores = torch.stack([(k * qg[:, :, g, None]).sum(-1) for g in range(G)], 2)
    else:
        scores = torch.matmul(k, qg.transpose(-1, -2)).transpose(-1, -2)
    scores = scores * D**-0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [B, K, G, S]
    if sums:
        vt = v.transpose(-1, -2)
        out = torch.stack([(vt * probs[:, :, g, None]).sum(-1) for g in range(G)], 2)
    elif v_transposed:
        out = torch.matmul(v.transpose(-1, -2), probs.transpose(-1, -2)).transpose(-1, -2)
    else:
        out = torch.matmul(probs, v)
    return out.reshape(B, H, 1, D)


def _threads() -> int:
    """The intra-op thread count (a constant inside compiled graphs once `prepare_compile` ran)."""
    return torch.get_num_threads()


def prepare_compile() -> None:
    """Make `_threads()` a constant inside compiled graphs (reading it would break the graph). Done on
    the first compile rather than at import: the decorator imports torch._dynamo, seconds of start-up
    for every command. Marking twice is harmless."""
    global _threads
    _threads = torch.compiler.assume_constant_result(_threads)


# Up to this many rows (decode steps of a batch), a product runs as the thread-split batched matmul;
# beyond, F.linear's own threading wins (mini and 1B shapes on 2 cores: 1.1-2.4x faster at 1-32 rows,
# 1.0-1.3x at 64-256, slower from 512).
SPLIT_MAX_ROWS = 32
PACKED_MAX_ROWS = 128  # a packed weight serves products up to this many rows (see PackedWeight)
# From this many rows, a product with a weight of at least ONEDNN_MIN_WEIGHT elements goes through
# oneDNN too, where it is the faster library: 2-core EPYC, 4-32 rows of 1024x1024 to 3072x1024
# weights, 1.4-2.0x faster than MKL on one thread and 1.2-1.9x faster than the split on two (the
# Flash projector `mlp2` over a vision pass's compressed tiles, decode steps of unpacked weights).
# Below either bound the split (or MKL on one thread) measured as fast or faster.
ONEDNN_MIN_ROWS, ONEDNN_MIN_WEIGHT = 4, 1 << 19


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None, half: Bf16Weight | None = None) -> torch.Tensor:
    """F.linear, with two CPU fp32 inference exceptions. Products of a few rows (decode steps): from 2
    rows through `packed` (a copy of `weight`) when given and still current, else, on a multi-threaded
    CPU, as a batched matmul over `threads` row blocks of the weight (a free view). MKL uses one core
    for such shapes: measured on 2 cores, 19 GB/s for F.linear vs 28 GB/s for the split, out of 37
    GB/s. One row keeps the split, which a compiled step turns into loops that stream the weight
    faster than the packed product (vit-heavy, 2 cores: 3.2 vs 4.4 ms per step). Larger products
    (prefills, ViT passes), and a few rows of a large weight (ONEDNN_MIN_ROWS), go through oneDNN
    where it measured clearly faster on this CPU (`cpu_matmul`). In a compiled step, a single row
    reads `half` (a bf16 copy) when given."""
    rows = x.numel() // x.shape[-1]
    if half is not None and rows == 1 and torch.compiler.is_compiling():
        n = _threads() if weight.shape[0] % _threads() == 0 else 1
        return _split_product(x, half.get(weight), bias, n)
    if packed is not None and 2 <= rows <= PACKED_MAX_ROWS and not torch.is_grad_enabled():
        w = packed.get(weight)
        if w is not None:
            return packed_op()(x, w, bias) if torch.compiler.is_compiling() else onednn_linear(x, w, bias)
    if _onednn_route(x, rows, weight):
        return onednn_product(x, weight, bias)
    n = _threads()
    if (n == 1 or x.device.type != "cpu" or rows > SPLIT_MAX_ROWS or weight.shape[0] % n
            or x.dtype != torch.float32 or torch.is_grad_enabled()):
        return F.linear(x, weight, bias)
    return _split_product(x, weight, bias, n)


def _split_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """F.linear as a batched matmul over `n` row blocks of the weight (a free view), which may be a
    bfloat16 copy: it is widened to x's dtype inside the product."""
    rows = x.numel() // x.shape[-1]
    # Row form [n, rows, K] @ [n, K, N/n]: the strides MKL takes fast (a column-vector layout of the
    # same product measured 5x slower). Compiled (a decode step), inductor turns it into a reduction
    # loop that streams the weight as fast, widening a bf16 weight as it loads it.
    w = weight.view(n, weight.shape[0] // n, weight.shape[1]).transpose(1, 2).to(x.dtype)
    out = torch.bmm(x.reshape(1, rows, -1).expand(n, -1, -1), w)  # [n, rows, N/n]
    out = out.transpose(0, 1).reshape(x.shape[:-1] + (weight.shape[0],))
    return out if bias is None else out + bias


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(linear(x)) (exact erf form); where `linear` takes oneDNN, the GELU runs inside the
    product's output pass (same values; mini's ViT fc1 over 64 tiles: 6.8 vs 7.1 ms on 2 cores,
    and no separate pass over its [rows, 4C] output)."""
    if _onednn_route(x, x.numel() // x.shape[-1], weight):
        return onednn_product(x, weight, bias, activation="gelu")
    return F.gelu(linear(x, weight, bias))


def _onednn_route(x: torch.Tensor, rows: int, weight: torch.Tensor) -> bool:
    """Whether a product of `rows` rows goes through oneDNN: prefill-sized (or a few rows of a large
    weight), CPU fp32 inference, outside compiled graphs (inductor lowers F.linear itself), where
    oneDNN measured clearly faster on this CPU (`cpu_matmul.onednn_faster`)."""
    # the row test last: in a compiled step it would split the graph's range of batch sizes
    sized = rows > SPLIT_MAX_ROWS or (weight.numel() >= ONEDNN_MIN_WEIGHT and not torch.compiler.is_compiling()
                                      and rows >= ONEDNN_MIN_ROWS)
    return (sized and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and onednn_faster(_threads()))


class FusedLinears:
    """Linears that read the same input (q/k/v, gate/up) with their weights, and biases, moved into one
    buffer: every parameter becomes a view of its rows, so nothing is duplicated, names and
    checkpoints are unchanged, and inference runs one product instead of several (fewer, larger
    matvecs per decode step). The buffer is found through the parameters' storage on each call, so
    a model moved or re-loaded since fusing falls back to the separate products."""

    def __init__(self, mods: list[nn.Linear]) -> None:
        self.mods, self.sizes = mods, [m.weight.shape[0] for m in mods]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(mods))]
        self.has_bias = mods[0].bias is not None
        self.packed: PackedWeight | None = None  # set by `pack` (inference on CPU)
        self.half: Bf16Weight | None = None  # set by `keep_bf16` (compiled decoding on CPU)
        for name in self._names:
            buffer = torch.cat([getattr(m, name).detach() for m in mods])
            for m, row, n in zip(mods, self.offsets, self.sizes):
                getattr(m, name).data = buffer[row:row + n]

    @property
    def _names(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.has_bias else ("weight",)

    def fused(self) -> bool:
        """Whether the parameters are still rows of one buffer each."""
        return all(self._buffer(n) is not None for n in self._names)

    def _view(self, name: str) -> torch.Tensor:
        """The whole buffer, as a strided view of the first module's parameter (traceable)."""
        first = getattr(self.mods[0], name)
        return first.as_strided((sum(self.sizes), *first.shape[1:]), first.stride())

    def _buffer(self, name: str) -> torch.Tensor | None:
        """The fused buffer behind every module's `name` parameter, or None if they no longer share it."""
        params = [getattr(m, name) for m in self.mods]
        first = params[0]
        row_bytes = first[0].numel() * first.element_size()
        if first.storage_offset() or first.untyped_storage().nbytes() != sum(self.sizes) * row_bytes or any(
                p.data_ptr() != first.data_ptr() + row * row_bytes for p, row in zip(params, self.offsets)):
            return None
        return self._view(name)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():
            # Storage checks cannot be traced: a compiled caller checks `fused()` eagerly first.
            buffers = [self._view(n) for n in self._names]
        elif not torch.is_grad_enabled():  # training: every parameter needs its own gradient
            buffers = [self._buffer(n) for n in self._names]
        else:
            buffers = [None]
        if all(b is not None for b in buffers):
            packed, half = self._current(self.packed), self._current(self.half)
            return list(linear(x, *buffers, packed=packed, half=half).split(self.sizes, -1))
        return [m(x) for m in self.mods]

    def _versions(self) -> tuple[int, ...]:
        # the buffer view follows the first module's version counter only: an in-place change to
        # another module's rows (k of q|k|v, up of gate|up) shows in its own counter
        return tuple(m.weight._version for m in self.mods)

    def _current(self, copy: WeightCopy | None) -> WeightCopy | None:
        """`copy` unless a module's weight changed in place since it was made (a compiled caller
        checks `copies_current` eagerly first)."""
        if copy is None or torch.compiler.is_compiling() or copy.members == self._versions():
            return copy
        return None

    def copies_current(self) -> bool:
        """Whether the packed and bf16 copies that exist still match the fused weight."""
        buffer = self._buffer("weight")
        return all(c is None or (buffer is not None and self._current(c) is not None and c.get(buffer) is not None)
                   for c in (self.packed, self.half))

    def pack(self) -> None:
        """Keep a `PackedWeight` of the fused weight (only while the parameters are fused)."""
        buffer = self._buffer("weight")
        self.packed = self._stamped(PackedWeight.of(buffer) if buffer is not None else None)

    def keep_bf16(self) -> bool:
        """Keep a `Bf16Weight` of the fused weight if its values allow; -> whether one was made."""
        buffer = self._buffer("weight")
        self.half = self._stamped(Bf16Weight.of(buffer) if buffer is not None else None)
        return self.half is not None

    def weight_now(self) -> torch.Tensor | None:
        """The fused weight [sum of rows, in] (None once the parameters no longer share one buffer)."""
        return self._buffer("weight")

    def bf16_now(self) -> torch.Tensor | None:
        """The bf16 copy of the fused weight if one exists and is current, else None."""
        return current_copy(self._current(self.half), self._buffer("weight"))

    def _stamped(self, copy: WeightCopy | None) -> WeightCopy | None:
        """`copy` with the version counters of the modules it covers (see `_current`)."""
        if copy is not None:
            copy.members = self._versions()
        return copy


class Embedding(nn.Embedding):
    """nn.Embedding (same parameter and name) without the random init on the meta device, where the
    loader fills it anyway: `normal_` on meta tensors imports torch._dynamo, seconds per process."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) routed through `linear()`, with optional copies of its
    weight: packed for products of a few rows (`pack`), bf16 for single rows in compiled steps
    (`keep_bf16`)."""

    packed: PackedWeight | None = None
    half: Bf16Weight | None = None

    def pack(self) -> None:
        self.packed = PackedWeight.of(self.weight)

    def keep_bf16(self) -> bool:
        self.half = Bf16Weight.of(self.weight)
        return self.half is not None

    def copies_current(self) -> bool:
        """Whether the packed and bf16 copies that exist still match the weight."""
        return all(c is None or c.current(self.weight) for c in (self.packed, self.half))

    def weight_now(self) -> torch.Tensor:
        return self.weight

    def bf16_now(self) -> torch.Tensor | None:
        """The bf16 copy of the weight if one exists and is current, else None."""
        return current_copy(self.half, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed, self.half)


class AttentionCache(Protocol):
    """What an LLM attention layer needs from a KV cache: store this step's k/v, attend over all.

    The static cache of `internvl35.generate` and the paged cache of the engine both implement it.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
