"""Parity with transformers' InternVL on tiny random checkpoints: logits, format round trips and
greedy generation (dense Qwen3, Qwen3-MoE and a 6B-style vision tower)."""

from __future__ import annotations

import pytest
import torch

import internvl35
from internvl35.generate import generate_stream
from internvl35.sampling import SamplingParams
from internvl35.weights.convert import convert
from tests.parity.hf_tiny import make_hf_model, save_hf

CASES = [("qwen3", "300m"), ("qwen3_moe", "300m"), ("qwen3", "6b")]


def _inputs(model: internvl35.ChatModel, image):
    prompt = model.build_prompt("Describe the image.", [image], max_tiles=4)
    return torch.tensor([prompt.input_ids]), prompt.pixel_values


@pytest.mark.parametrize("text,vision", CASES)
def test_logits_match_transformers(tmp_path, tokenizer, image, text, vision):
    hf = make_hf_model(tokenizer, text, vision)
    ours = internvl35.load(save_hf(hf, tokenizer, tmp_path / "hf"))
    ids, pv = _inputs(ours, image)
    assert pv.shape[0] > 1, "the prompt should exercise several tiles"
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv).logits
    got = ours(ids, pixel_values=pv)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("text,vision", CASES)
def test_convert_round_trip_is_exact(tmp_path, tokenizer, image, text, vision):
    hf = make_hf_model(tokenizer, text, vision, seed=1)
    src = save_hf(hf, tokenizer, tmp_path / "hf")
    convert(src, tmp_path / "custom", "custom", dtype=torch.float32)
    convert(tmp_path / "custom", tmp_path / "hf2", "hf", dtype=torch.float32)
    a, b, c = (internvl35.load(p) for p in (src, tmp_path / "custom", tmp_path / "hf2"))
    assert (a.format, b.format, c.format) == ("hf", "custom", "hf")
    ids, pv = _inputs(a, image)
    la = a(ids, pixel_values=pv)
    assert torch.equal(la, b(ids, pixel_values=pv))
    assert torch.equal(la, c(ids, pixel_values=pv))
    # and transformers itself loads the directory we wrote
    from transformers import InternVLForConditionalGeneration
    reloaded = InternVLForConditionalGeneration.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        assert (reloaded(input_ids=ids, pixel_values=pv).logits - la).abs().max().item() <= 1e-4


@pytest.mark.parametrize("text,vision", CASES[:2])
def test_greedy_generation_matches_transformers(tmp_path, tokenizer, image, text, vision):
    hf = make_hf_model(tokenizer, text, vision, seed=2)
    ours = internvl35.load(save_hf(hf, tokenizer, tmp_path / "hf"))
    ids, pv = _inputs(ours, image)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = tokenizer.pad_id
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids),
                          max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, ids.shape[1]:].tolist()
    feats, _ = ours.model.encode_images(pv)
    steps = generate_stream(ours.model, [ids[0].tolist()], SamplingParams(max_new_tokens=32), set(), feats)
    got = [s[0] for s in steps]
    assert len(got) == 32
    assert got == ref


def test_tied_head_is_loaded_from_embeddings(tmp_path, tokenizer, image):
    hf = make_hf_model(tokenizer, tie=True, seed=3)
    ours = internvl35.load(save_hf(hf, tokenizer, tmp_path / "hf"))
    assert ours.model.language_model.tied
    ids, pv = _inputs(ours, image)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv).logits
    assert (ours(ids, pixel_values=pv) - ref).abs().max().item() <= 1e-4
