"""The native decode step (C, one parallel region per step) against the model's own eager step."""

import ctypes
import dataclasses
import shutil

import pytest
import torch

import internvl35
from internvl35.config import get_config
from internvl35.generate import StaticKVCache, _decode_step, generate_stream
from internvl35.kernels import build
from internvl35.kernels.decode import NativeDecoder
from internvl35.models.internvl import InternVLModel
from internvl35.models.qwen3 import bf16_copies_, fuse_projections_
from internvl35.sampling import SamplingParams
from tests.conftest import tiny_config, write_tiny

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def _odd_model(tmp_path, tokenizer, bf16: bool):
    """Tiny random weights whose widths are no multiple of the kernel's 32-value vectors (its tail
    loops run too), optionally rounded to bf16 values (then the step reads the bf16 copies)."""
    cfg = tiny_config(tokenizer.vocab_size)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, hidden_size=72, head_dim=24, num_heads=6,
                                                            num_kv_heads=2, intermediate_size=100))
    m = internvl35.load(write_tiny(tmp_path / "odd", tokenizer, cfg))
    if bf16:
        with torch.no_grad():
            for p in m.model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        assert bf16_copies_(m.model)
    return m


@needs_cc
@pytest.mark.parametrize("bf16", [False, True])
def test_native_step_matches_eager_step(tmp_path, tokenizer, bf16):
    """Logits, and the K/V each step writes into the cache, over a prompt prefilled eagerly."""
    m = _odd_model(tmp_path, tokenizer, bf16)
    ids = torch.tensor([m.build_prompt("Describe the picture in a few words.").input_ids])
    L = ids.shape[1]
    ref, nat = StaticKVCache(m.model, 1, L + 8), StaticKVCache(m.model, 1, L + 8, v_transposed=False)
    assert NativeDecoder.applies(m.model)
    with torch.inference_mode():
        for c in (ref, nat):
            c.begin(torch.ones(1, L, dtype=torch.bool))
            m.model(ids, positions=torch.arange(L)[None], cache=c, last_only=True)
            c.end()
        step = NativeDecoder(m.model, nat)
        assert step.bf16 == bf16
        token = 7
        for pos in range(L, L + 8):
            for c in (ref, nat):
                c.begin(torch.ones(1, 1, dtype=torch.bool))
            want = _decode_step(m.model, torch.tensor([[token]]), torch.tensor([[pos]]), ref)[0, -1]
            got, best = step(token, pos)
            assert best == int(got.argmax())
            for c in (ref, nat):
                c.end()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for a, b in zip(ref.k, nat.k):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            for a, b in zip(ref.v, nat.v):
                torch.testing.assert_close(b, a.transpose(-1, -2), rtol=1e-5, atol=1e-5)
            token = int(want.argmax())


@needs_cc
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=24),
                                    SamplingParams(max_new_tokens=24, repetition_penalty=1.3),
                                    SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=3)])
def test_native_generation_equals_torch_generation(mini, image, params):
    """The trained mini model: tokens through the C step equal the torch steps', with an image;
    greedy (the kernel's argmax), with a repetition penalty and seeded sampling (torch's selection)."""
    p = mini.build_prompt("How many shapes are there? Answer briefly.", [image])
    feats = mini.model.encode_images(p.pixel_values)[0]
    assert NativeDecoder.applies(mini.model)
    native = list(generate_stream(mini.model, [p.input_ids], params, set(), feats, native=True))
    torch_steps = list(generate_stream(mini.model, [p.input_ids], params, set(), feats, native=False))
    assert native == torch_steps and len(native) == 24


@needs_cc
def test_native_argmax_takes_the_first_maximum_and_nan(tmp_path, tokenizer):
    """The kernel's argmax as torch.argmax: the first of tied maxima, across the threads' row blocks,
    and a NaN logit before any number."""
    m = _odd_model(tmp_path, tokenizer, bf16=False)
    head = m.model.language_model.head_weight
    V = head.shape[0]
    cache = StaticKVCache(m.model, 1, 4, v_transposed=False)
    step = NativeDecoder(m.model, cache)
    with torch.no_grad():
        logits, _ = step(3, 0)
        top = int(logits.argmax())
        for row in (V - 1, V // 2, 1):  # ties with the maximum: in the last, a middle and an early row
            head[row] = head[top]
            logits, best = step(3, 0)
            assert best == int(logits.argmax()) == min(row, top)
        head[V - 2] = float("nan")
        logits, best = step(3, 0)
        assert best == int(logits.argmax()) == V - 2


def test_native_step_declines_what_it_does_not_cover(tmp_path, mini, monkeypatch):
    """MoE blocks, unfused projections, other cache layouts, INTERNVL35_NATIVE=0, a failing compiler
    and an unusable cache directory leave decoding to torch."""
    moe = InternVLModel(get_config("mini-moe"))
    fuse_projections_(moe)
    assert not NativeDecoder.applies(moe)
    assert not NativeDecoder.applies(InternVLModel(get_config("mini")))  # q/k/v not fused
    with pytest.raises(ValueError, match="untransposed"):
        NativeDecoder(mini.model, StaticKVCache(mini.model, 1, 8))
    monkeypatch.setenv("INTERNVL35_NATIVE", "0")
    assert not NativeDecoder.applies(mini.model)
    monkeypatch.setenv("INTERNVL35_NATIVE", "1")
    monkeypatch.setenv("INTERNVL35_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that fails every build
    assert build.load_kernel("decode_step") is None
    assert not list((tmp_path / "cache").rglob("*.so"))
    monkeypatch.delenv("CC")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("INTERNVL35_CACHE", str(tmp_path / "file"))  # a cache directory that cannot be made
    build._build.cache_clear()
    try:
        assert build.load_kernel("decode_step") is None
    finally:
        build._build.cache_clear()  # later tests build (or find) the kernel in the usual place


@needs_cc
def test_a_kernel_whose_plan_differs_is_refused(mini, monkeypatch):
    """The C struct and its ctypes mirror must agree: a library whose Plan has another size (a source
    edited without the other side) is refused before it is handed a pointer."""
    import types

    from internvl35.kernels import decode

    def plan_bytes() -> int:
        return ctypes.sizeof(decode._Plan) - 8

    other = types.SimpleNamespace(decode_step=build.load_kernel("decode_step").decode_step, plan_bytes=plan_bytes)
    monkeypatch.setattr(decode, "load_kernel", lambda name: other)
    with pytest.raises(RuntimeError, match="Plan has"):
        NativeDecoder(mini.model, StaticKVCache(mini.model, 1, 8, v_transposed=False))
