"""The single-query (decode) attention paths equal SDPA, whatever layout the cache keeps V in."""

import pytest
import torch
import torch.nn.functional as F

from internvl35.models.layers import attention


def _inputs(S: int = 37, H: int = 8, K: int = 2, D: int = 16, B: int = 2):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, K, S, D, generator=g)
    v = torch.randn(B, K, S, D, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True  # every row attends somewhere
    return q, k, v, mask


def _reference(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("masked", [True, False])
def test_decode_attention_over_a_transposed_v_equals_sdpa(masked):
    q, k, v, mask = _inputs()
    mask = mask if masked else None
    v_t = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # V stored [B, K, Dh, S], as StaticKVCache
    assert v_t.stride(-2) == 1 and torch.equal(v_t, v)
    want = _reference(q, k, v, mask)
    eager = attention(q, k, v_t, causal=False, mask=mask)
    compiled = torch.compile(lambda *a: attention(*a, causal=False, mask=mask), dynamic=False)(q, k, v_t)
    torch.testing.assert_close(eager, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, want, atol=1e-5, rtol=1e-5)


def test_compiled_decode_attention_over_a_plain_v_equals_sdpa():
    """The paged cache hands gathered [B, K, S, Dh] views: the matmul form under torch.compile."""
    q, k, v, mask = _inputs()
    got = torch.compile(lambda *a: attention(*a, causal=False, mask=mask), dynamic=False)(q, k, v)
    torch.testing.assert_close(got, _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_prefill_over_a_transposed_v_equals_sdpa():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 9, 16, generator=g) for n in (4, 2, 2))
    v_t = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(attention(q, k, v_t, causal=True), want, atol=1e-6, rtol=1e-6)
