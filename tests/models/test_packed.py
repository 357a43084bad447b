"""Packed (oneDNN blocked) weight copies for decode-sized products: same outputs as the plain
weights, used exactly for 2..PACKED_MAX_ROWS rows, and ignored once a weight has changed."""

import pytest
import torch

from internvl35.models import layers
from internvl35.models.qwen3 import fuse_projections_, pack_weights_, require_weights_as_prepared
from tests.models.test_fused import _forward, _lm

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def _packed_calls(lm, x) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Logits and the weight shapes of the products that went through a packed weight."""
    calls = []
    real = layers.onednn_linear
    layers.onednn_linear = lambda x_, w, b: calls.append(tuple(w.shape)) or real(x_, w, b)
    try:
        with torch.inference_mode():
            return _forward(lm, x), calls
    finally:
        layers.onednn_linear = real


@pytest.mark.parametrize("fuse", [True, False])
def test_packed_products_equal_plain_for_decode_rows_only(fuse):
    lm = _lm(bias=True)
    if fuse:
        fuse_projections_(lm)
    plain = {}
    for rows in (1, 2, 7, layers.PACKED_MAX_ROWS + 1):
        x = torch.randn(1, rows, 64)
        with torch.inference_mode():
            plain[rows] = (x, _forward(lm, x))
    pack_weights_(lm)
    qkv = (128, 64) if fuse else (64, 64)
    for rows, (x, ref) in plain.items():
        got, calls = _packed_calls(lm, x)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
        if 2 <= rows <= layers.PACKED_MAX_ROWS:  # every product of both layers and the head
            assert qkv in calls and (64, 64) in calls and (50, 64) in calls
            assert len(calls) == 2 * (2 + 2 if fuse else 3 + 1 + 3) + 1
        else:
            assert calls == []


def _change_down_and_q(lm) -> None:
    lm.model.layers[1].mlp.down_proj.weight.mul_(2.0)  # in place: the version counter moves
    lm.model.layers[0].self_attn.q_proj.weight.mul_(0.5)  # the first row block of the fused q|k|v buffer


def _change_v_and_up(lm) -> None:
    # the fused buffer's view follows its first module's version counter: a change to v (or up)
    # alone must still retire the q|k|v (gate|up) copy
    lm.model.layers[0].self_attn.v_proj.weight.mul_(0.5)
    lm.model.layers[1].mlp.up_proj.weight.mul_(2.0)


@pytest.mark.parametrize("change, still_packed", [(_change_down_and_q, {(64, 96): 1, (128, 64): 1}),
                                                  (_change_v_and_up, {(128, 64): 1, (192, 64): 1})])
def test_changed_weights_invalidate_their_packed_copies(change, still_packed):
    lm = _lm()
    fuse_projections_(lm)
    pack_weights_(lm)
    require_weights_as_prepared(lm)  # raises if anything is off
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        change(lm)
    with pytest.raises(ValueError, match="packed weights"):  # a compiled step would read stale copies
        require_weights_as_prepared(lm)
    got, calls = _packed_calls(lm, x)
    assert {shape: calls.count(shape) for shape in still_packed} == still_packed  # only the other layer's
    lm_ref = _lm()  # the same weights, never fused or packed, with the same changes
    with torch.no_grad():
        change(lm_ref)
    with torch.inference_mode():
        expected = _forward(lm_ref, x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_load_packs_fp32_cpu_models_and_says_when_it_cannot():
    import internvl35

    m = internvl35.load("mini", pack_weights=True)
    assert m.model.language_model.model.layers[0].mlp.down_proj.packed is not None
    with pytest.warns(UserWarning, match="fp32 models on CPU"):
        m = internvl35.load("mini", dtype=torch.bfloat16, pack_weights=True)
    assert m.model.language_model.model.layers[0].mlp.down_proj.packed is None
