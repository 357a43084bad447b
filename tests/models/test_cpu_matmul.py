"""Large CPU products through oneDNN: equality with F.linear, padded row counts, and the routing
that `linear()` takes from the measured (or forced) library choice."""

import pytest
import torch
import torch.nn.functional as F

from internvl35.models import cpu_matmul, layers

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def test_padded_rows_bounded_waste_and_shape_count():
    sizes = [cpu_matmul.padded_rows(r) for r in range(1, 8193)]
    for r, p in enumerate(sizes, start=1):
        assert p >= r and p % 8 == 0
        if r >= 256:
            assert p <= r * 1.032
    assert cpu_matmul.padded_rows(1025) == 1056  # one 448px tile with its class token
    assert len(set(sizes)) <= 32 * 8 + 32  # 32 sizes per power of two above 256


@needs_onednn
@pytest.mark.parametrize("shape", [(33, 24), (2, 50, 24), (1025, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_product_equals_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    got = cpu_matmul.onednn_product(x, w, b)
    assert got.shape == (*shape[:-1], 40) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.fixture
def forced(monkeypatch):
    """Force the library choice through the environment; the measured choice is restored after."""
    def force(value: str) -> None:
        monkeypatch.setenv("INTERNVL35_CPU_MATMUL", value)
        cpu_matmul.onednn_faster.cache_clear()
    yield force
    monkeypatch.delenv("INTERNVL35_CPU_MATMUL")
    cpu_matmul.onednn_faster.cache_clear()


@needs_onednn
def test_linear_routes_large_products_by_the_choice(forced, monkeypatch):
    calls = []
    real = layers.onednn_product
    monkeypatch.setattr(layers, "onednn_product", lambda x, w, b: calls.append(x.shape) or real(x, w, b))
    w, b = torch.randn(40, 24), torch.randn(40)
    small, large = torch.randn(layers.SPLIT_MAX_ROWS, 24), torch.randn(layers.SPLIT_MAX_ROWS + 1, 24)
    for value, expect in (("onednn", [large.shape]), ("blas", [])):
        forced(value)
        calls.clear()
        with torch.inference_mode():
            for x in (small, large):
                torch.testing.assert_close(layers.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        assert calls == expect, value
    forced("onednn")
    calls.clear()
    layers.linear(large, w, b)  # with autograd on (training): F.linear, whatever the choice
    assert calls == []


@needs_onednn
def test_linear_routes_a_few_rows_of_a_large_weight_by_the_choice(forced, monkeypatch):
    """From ONEDNN_MIN_ROWS rows, a weight of ONEDNN_MIN_WEIGHT elements takes oneDNN when chosen;
    fewer rows, or a smaller weight, keep the split / BLAS paths."""
    calls = []
    real = layers.onednn_product
    monkeypatch.setattr(layers, "onednn_product", lambda x, w, b: calls.append(tuple(x.shape)) or real(x, w, b))
    large, small = torch.randn(layers.ONEDNN_MIN_WEIGHT // 256, 256), torch.randn(40, 24)
    n = layers.ONEDNN_MIN_ROWS
    for value, expect in (("onednn", [(n, 256)]), ("blas", [])):
        forced(value)
        calls.clear()
        with torch.inference_mode():
            for w, rows in ((large, n - 1), (large, n), (small, n)):
                x = torch.randn(rows, w.shape[1])
                torch.testing.assert_close(layers.linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)
        assert calls == expect, value


def test_bad_choice_is_rejected(forced):
    forced("fast")
    with pytest.raises(ValueError, match="INTERNVL35_CPU_MATMUL"):
        cpu_matmul.onednn_faster(1)


@needs_onednn
@pytest.mark.parametrize("choice", ["onednn", "blas"])
def test_linear_gelu_equals_gelu_of_linear(forced, choice):
    forced(choice)
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 40, 24, generator=g), torch.randn(64, 24, generator=g), torch.randn(64, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(layers.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)), atol=1e-5, rtol=1e-5)
