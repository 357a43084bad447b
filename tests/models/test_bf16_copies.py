"""bf16 copies of LLM weights whose values are all bf16 (weights loaded from bf16 storage): made only
where exact, read by single-row products inside compiled steps and nowhere else, with the fp32
weights' results, and refused once a weight has changed."""

import pytest
import torch
import torch.nn.functional as F

import internvl35
from internvl35.models import layers, weight_copies
from internvl35.models.qwen3 import bf16_copies_, fuse_projections_, require_weights_as_prepared
from tests.models.test_fused import _forward, _lm


def _bf16_valued_lm():
    lm = _lm(bias=True)
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(p.bfloat16().float())
    fuse_projections_(lm)
    return lm


def test_bf16_exact_reads_the_low_bits():
    w = torch.randn(64, 32)
    assert not weight_copies.bf16_exact(w)
    assert weight_copies.bf16_exact(w.bfloat16().float())
    assert not weight_copies.bf16_exact(w.bfloat16())  # a bf16 tensor is not an fp32 weight to copy
    assert not weight_copies.bf16_exact(w.bfloat16().float().t())  # nor a strided view


def test_copies_only_where_every_value_is_bf16():
    lm = _bf16_valued_lm()
    assert bf16_copies_(lm)
    attn, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    assert attn.qkv.half is not None and mlp.gate_up.half is not None and lm.head_half is not None
    assert torch.equal(mlp.down_proj.half.tensor.float(), mlp.down_proj.weight)
    require_weights_as_prepared(lm)

    other = _bf16_valued_lm()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # no longer a bf16 value
    assert not bf16_copies_(other)
    assert other.model.layers[1].mlp.down_proj.half is None
    assert other.model.layers[0].mlp.down_proj.half is not None


def test_compiled_single_rows_read_the_copy_and_nothing_else_does():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g).bfloat16().float(), torch.randn(40, generator=g)
    decoy = layers.Bf16Weight(torch.randn(40, 24, generator=g).bfloat16().float())
    step = torch.compile(lambda x, half: layers.linear(x, w, b, half=half), dynamic=False)
    one, three = torch.randn(1, 1, 24, generator=g), torch.randn(1, 3, 24, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(step(one, layers.Bf16Weight(w)), F.linear(one, w, b))
        # what a single compiled row multiplies by is the copy: a copy of other values shows it
        torch.testing.assert_close(step(one, decoy), F.linear(one, decoy.tensor.float(), b))
        torch.testing.assert_close(step(three, decoy), F.linear(three, w, b))  # more rows: the weight
        torch.testing.assert_close(layers.linear(one, w, b, half=decoy), F.linear(one, w, b))  # eager


def test_changed_weights_invalidate_their_bf16_copies():
    lm = _bf16_valued_lm()
    bf16_copies_(lm)
    with torch.no_grad():
        lm.model.layers[0].self_attn.k_proj.weight.mul_(2.0)  # a row block of the fused q|k|v buffer
    with pytest.raises(ValueError, match="bf16 copies"):  # a compiled step would read stale copies
        require_weights_as_prepared(lm)


def test_compiled_loading_keeps_copies_and_decodes_as_eager(image):
    compiled, eager = internvl35.load("mini", compile=True), internvl35.load("mini")  # stored in bf16
    assert compiled.model.language_model.head_half is not None
    assert eager.model.language_model.head_half is None
    q = "Describe the image."
    assert compiled.chat(q, [image], max_new_tokens=12) == eager.chat(q, [image], max_new_tokens=12)
    x = torch.randn(1, 1, compiled.cfg.text.hidden_size)
    with torch.inference_mode():  # the same logits from both, eagerly (copies unused there)
        torch.testing.assert_close(_forward(compiled.model.language_model, x), _forward(eager.model.language_model, x))
