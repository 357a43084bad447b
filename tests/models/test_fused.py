"""Fused q/k/v and gate/up products: same outputs, no extra memory, names and gradients unchanged,
and a safe fallback once the parameters no longer share the fused buffer."""

import torch

from internvl35.config import TextConfig
from internvl35.models import layers
from internvl35.models.qwen3 import Qwen3ForCausalLM, fuse_projections_
from tests.conftest import randomize_


def _lm(bias: bool = False) -> Qwen3ForCausalLM:
    cfg = TextConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     intermediate_size=96, vocab_size=50, attention_bias=bias)
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(cfg)
    randomize_(lm)
    return lm


def _forward(lm, x):
    pos = torch.arange(x.shape[1])[None]
    return lm.logits(lm.model(x, pos))


def test_fused_products_equal_separate_and_share_memory():
    for bias in (False, True):
        lm = _lm(bias)
        x = torch.randn(1, 5, 64)
        before = {k: v.clone() for k, v in lm.state_dict().items()}
        with torch.inference_mode():
            ref = _forward(lm, x)
        fuse_projections_(lm)
        attn = lm.model.layers[0].self_attn
        assert attn.qkv is not None and attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes == \
            attn.k_proj.weight.data_ptr()  # views of one buffer: nothing duplicated
        assert {k: v for k, v in lm.state_dict().items()}.keys() == before.keys()
        assert all(torch.equal(lm.state_dict()[k], v) for k, v in before.items())
        with torch.inference_mode():
            got = _forward(lm, x)
            got_row = _forward(lm, x[:, :1])  # the single-row (decode) path
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(got_row, ref[:, :1], atol=1e-5, rtol=1e-5)


def test_training_gets_gradients_and_moved_parameters_fall_back():
    lm = _lm()
    fuse_projections_(lm)
    x = torch.randn(1, 4, 64)
    _forward(lm, x).sum().backward()  # grad mode: the separate products, so every weight gets a gradient
    attn, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.up_proj.weight))
    def weight_shapes(x):
        calls = []
        real = layers.linear  # every product of the model goes through it (F.linear or the split)
        layers.linear = lambda *a, **k: calls.append(tuple(a[1].shape)) or real(*a, **k)
        try:
            with torch.inference_mode():
                return _forward(lm, x), calls
        finally:
            layers.linear = real

    ref, calls = weight_shapes(x)
    assert (128, 64) in calls and (32, 64) not in calls  # q|k|v in one product
    lm.to(torch.float64)  # every parameter gets new storage: the fused view must not be used
    got, calls = weight_shapes(x.double())
    assert torch.allclose(got.float(), ref, atol=1e-5)
    assert (128, 64) not in calls and (32, 64) in calls  # k alone


def test_split_product_equals_f_linear_for_few_rows():
    """The thread-split product serves 1..SPLIT_MAX_ROWS rows; beyond it F.linear runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the split only runs with several threads
    calls = []
    real = torch.bmm
    torch.bmm = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    try:
        w, b = torch.randn(96, 48), torch.randn(96)
        for rows in (1, 3, layers.SPLIT_MAX_ROWS, layers.SPLIT_MAX_ROWS + 1):
            x = torch.randn(1, rows, 48)
            calls.clear()
            with torch.inference_mode():
                got = layers.linear(x, w, b)
            assert got.shape == (1, rows, 96)
            assert torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)
            assert calls == ([] if rows > layers.SPLIT_MAX_ROWS else [(2, rows, 48)])
    finally:
        torch.bmm = real
        torch.set_num_threads(threads)
