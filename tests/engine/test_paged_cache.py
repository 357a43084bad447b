"""PagedKVCache.attend over a mixed step equals attention computed sequence by sequence: fresh
prefills grouped by length (padded, one call per group), a prefill over a cached prefix, decodes,
and padding rows at the end of the step."""

import torch
import torch.nn.functional as F

from internvl35.engine.paged_cache import PagedKVCache, build_layout

H, K, D, BS = 4, 2, 8, 4


def _reference(q, ctx_k, ctx_v):
    """One sequence: q [H, n, D] over keys/values [K, ctx, D] whose last n rows are its new tokens."""
    ctx, n = ctx_k.shape[1], q.shape[1]
    mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    return F.scaled_dot_product_attention(q[None], ctx_k[None], ctx_v[None], attn_mask=mask, enable_gqa=True)[0]


def test_attend_mixed_step_equals_per_sequence_attention():
    g = torch.Generator().manual_seed(0)
    cache = PagedKVCache(1, 64, BS, K, D, torch.float32, torch.device("cpu"))
    # (tokens cached before, new tokens): fresh prefills of 9, 7, 5 (one group) and 2 (alone:
    # under half the longest), a prefill after 6 cached tokens, two decodes
    seqs = [(0, 9), (0, 7), (6, 5), (0, 5), (0, 2), (10, 1), (3, 1)]
    tables, used = [], 0
    for cached, new in seqs:
        n = -(-(cached + new) // BS)
        tables.append(list(range(used, used + n))[::-1])  # blocks out of order, as after reuse
        used += n
    history = {}
    for i, (cached, _) in enumerate(seqs):  # the cached tokens' K/V, written as earlier steps would
        if cached:
            kh, vh = torch.randn(2, K, cached, D, generator=g)
            history[i] = (kh, vh)
            cache.layout = build_layout([(tables[i], 0, cached)], BS, torch.device("cpu"))
            cache.attend(0, torch.randn(1, H, cached, D, generator=g), kh[None], vh[None])
    T = sum(new for _, new in seqs)
    pad = 3  # rows past the layout's tokens
    q, k, v = torch.randn(1, H, T + pad, D, generator=g), *torch.randn(2, 1, K, T + pad, D, generator=g)
    cache.layout = build_layout([(t, c, n) for t, (c, n) in zip(tables, seqs)], BS, torch.device("cpu"))
    assert [(f.gather.shape[0] if f.gather is not None else 1) for f in cache.layout.fresh] == [3, 1]
    out = cache.attend(0, q, k, v)
    row = 0
    for i, (cached, new) in enumerate(seqs):
        kh, vh = history.get(i, (torch.zeros(K, 0, D), torch.zeros(K, 0, D)))
        ctx_k = torch.cat([kh, k[0, :, row:row + new]], 1)
        ctx_v = torch.cat([vh, v[0, :, row:row + new]], 1)
        want = _reference(q[0, :, row:row + new], ctx_k, ctx_v)
        torch.testing.assert_close(out[0, :, row:row + new], want, atol=1e-5, rtol=1e-5)
        row += new
    assert out[0, :, T:].abs().max() == 0  # padding rows: zero, and not stored


def test_decode_operator_returns_the_layout_its_fake_declares():
    """Compiled steps trust the fake kernel's strides. The real output's layout depends on the
    kernel (CUDA's SDPA hands back a transposed one; on the CPU a [B, D, H]-ordered query gives a
    contiguous output): a fake that copied the query's strides made inductor read it wrongly."""
    from internvl35.engine.paged_cache import DECODE_OP, register_decode_op

    register_decode_op()
    g = torch.Generator().manual_seed(0)
    B, H, K, D, S, N = 3, 4, 2, 16, 5, 12
    kc, vc = torch.randn(N, K, D, generator=g), torch.randn(N, K, D, generator=g)
    slots = torch.randint(0, N, (B, S), generator=g)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., 3:] = False
    queries = {"contiguous": torch.randn(B, H, D, generator=g),
               "heads outer": torch.randn(H, B, D, generator=g).transpose(0, 1),
               "channels outer": torch.randn(B, D, H, generator=g).transpose(1, 2)}
    op = getattr(torch.ops.internvl35, DECODE_OP.split("::")[1]).default
    for q in queries.values():
        torch.library.opcheck(op, (q, kc, vc, slots, mask), test_utils=("test_faketensor",))
