"""The engine's outputs equal `model.chat` token for token: mixed requests submitted together,
with prefix and feature caching, under KV pressure (preemption), with Flash and with MoE."""

from __future__ import annotations

import pytest
import torch

from internvl35.data.world import generate
from internvl35.engine.llm_engine import EngineConfig, LLMEngine
from internvl35.engine.paged_cache import DECODE_OP
from internvl35.errors import InputError
from internvl35.generate import generate_stream
from internvl35.sampling import SamplingParams


def chat_ids(cm, prompt, params, flash=None) -> list[int]:
    """Reference: the plain static-cache generation that `model.chat` runs."""
    ids, feats = cm.encode(prompt, flash)
    out = []
    for step in generate_stream(cm.model, [ids], params, cm.stop_ids, feats, cm.tokenizer.pad_id):
        if step[0] is None or step[0] in cm.stop_ids:
            break
        out.append(step[0])
    return out


def mixed_prompts(cm, n: int = 18):
    """Single images (1-6 tiles), multi-image, video frames, text only, a repeated image."""
    fams = ["attributes", "counting", "multi_image", "video", "hires", "text_only", "charts", "spatial", "text"]
    prompts = []
    for i in range(n):
        s = generate(fams[i % len(fams)], 2**48 + 1000 + i)
        if s.video:
            prompts.append(cm.build_prompt(s.question, video=s.images))
        else:
            prompts.append(cm.build_prompt(s.question, s.images))
    first = generate("attributes", 2**48 + 1000)
    prompts.append(cm.build_prompt("Describe the image.", first.images))  # same image, other question
    prompts.append(prompts[0])  # an identical request: full prefix hit
    return prompts


def test_engine_greedy_equals_chat_for_mixed_concurrent_requests(mini):
    prompts = mixed_prompts(mini)
    params = [SamplingParams(max_new_tokens=8 + 3 * (i % 5)) for i in range(len(prompts))]
    engine = LLMEngine(mini, EngineConfig(block_size=8))
    got = engine.generate(prompts, params)
    want = [chat_ids(mini, p, sp) for p, sp in zip(prompts, params)]
    assert len(prompts) >= 16 and got == want
    assert engine.stats["cached_prompt_tokens"] > 0  # the repeated prompt reused KV blocks
    assert engine.features.hits >= 2  # ... and the repeated image its vision features
    assert any(p.pixel_values is not None and len(p.tiles_per_image) > 1 for p in prompts)
    assert any(p.pixel_values is None for p in prompts)
    assert engine.block_manager.num_free == engine.num_blocks  # everything released


def test_prefills_put_back_for_want_of_step_budget_keep_outputs(mini):
    """A step budget that fits about one prompt: prefills are allocated, put back and admitted
    again later, and nothing of theirs counts as cached before it was computed."""
    prompts = mixed_prompts(mini, 8)
    params = SamplingParams(max_new_tokens=6)
    budget = max(len(p.input_ids) for p in prompts) + 8
    assert sum(len(p.input_ids) for p in prompts) > 2 * budget
    engine = LLMEngine(mini, EngineConfig(block_size=8, max_num_batched_tokens=budget))
    assert engine.generate(prompts, params) == [chat_ids(mini, p, params) for p in prompts]


def test_padded_step_rows_change_nothing(mini, monkeypatch):
    """Steps run on row counts rounded up by `padded_rows`, the extra rows ignored by attention:
    tokens and KV cache equal those of steps on the exact rows."""
    from internvl35.engine import model_runner

    prompts, params = mixed_prompts(mini, 6), SamplingParams(max_new_tokens=6)
    real, rows = model_runner.padded_rows, []
    monkeypatch.setattr(model_runner, "padded_rows", lambda r: rows.append(r) or real(r))
    padded = LLMEngine(mini, EngineConfig(block_size=8))
    got = padded.generate(prompts, params)
    assert any(real(r) > r for r in rows)  # some step had extra rows
    monkeypatch.setattr(model_runner, "padded_rows", lambda r: r)
    exact = LLMEngine(mini, EngineConfig(block_size=8))
    assert got == exact.generate(prompts, params)
    for a, b in zip(padded.runner.cache.k + padded.runner.cache.v, exact.runner.cache.k + exact.runner.cache.v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # extra rows stored nowhere


def test_encode_batch_shares_vit_passes_and_encodes_each_image_once(mini, monkeypatch):
    from internvl35.engine.mm_cache import image_keys

    prompts = mixed_prompts(mini)
    passes = []  # (requests, tiles) of every ViT pass
    encode = mini.model.encode_requests
    monkeypatch.setattr(mini.model, "encode_requests",
                        lambda pvs, flash: passes.append((len(pvs), sum(len(p) for p in pvs))) or encode(pvs, flash))
    got = LLMEngine(mini, EngineConfig(max_vision_tiles=8)).encode_batch([(p, None) for p in prompts])
    monkeypatch.undo()
    distinct = {k: n for p in prompts if p.pixel_values is not None
                for k, n in zip(image_keys(p, None), p.tiles_per_image)}
    assert sum(t for _, t in passes) == sum(distinct.values())  # the repeated image was encoded once
    assert all(t <= 8 or n == 1 for n, t in passes) and max(n for n, _ in passes) > 1
    for p, enc in zip(prompts, got):  # the same as each prompt encoded alone
        alone = LLMEngine(mini).encode(p)
        assert enc.input_ids == alone.input_ids
        if alone.features is not None:
            torch.testing.assert_close(enc.features, alone.features, rtol=1e-4, atol=1e-5)


def random_chat_model(name: str, tokenizer):
    """Random weights never stop early, so every request keeps growing its KV."""
    from internvl35.chat import ChatModel
    from internvl35.config import get_config
    from internvl35.models.internvl import InternVLModel
    from tests.conftest import randomize_

    torch.manual_seed(0)
    # 112 px tiles (16 tokens each) keep the prompts short
    model = InternVLModel(get_config(name, vision={"image_size": 112})).eval()
    randomize_(model)
    return ChatModel(model, tokenizer)


def test_preemption_by_recompute_keeps_outputs(tokenizer):
    cm = random_chat_model("mini", tokenizer)
    prompts = mixed_prompts(cm, 10)
    params = SamplingParams(max_new_tokens=24)
    engine = LLMEngine(cm, EngineConfig(block_size=4, num_blocks=160))
    got = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert got == [chat_ids(cm, p, params) for p in prompts]


def test_sampling_with_seed_matches_chat_and_stop_strings(mini):
    s = generate("text_only", 2**48 + 7)
    prompt = mini.build_prompt(s.question)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=3)
    engine = LLMEngine(mini)
    assert engine.generate([prompt], params)[0] == chat_ids(mini, prompt, params)
    # a stop string ends the output before it, and streaming never shows a part of it; the prompt is
    # the first whose greedy answer is long enough to cut inside (the answers depend on the weights)
    for seed in range(2**48 + 7, 2**48 + 40):
        prompt = mini.build_prompt(generate("text_only", seed).question)
        full = mini.tokenizer.decode(chat_ids(mini, prompt, SamplingParams(max_new_tokens=12)))
        if len(full.strip()) >= 5:
            break
    stop = full.strip()[2:4]
    assert len(stop) == 2
    engine.add_request("r", prompt, SamplingParams(max_new_tokens=12), stop=(stop,))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason == "stop" and stop not in text and full.startswith(text)


def test_abort_and_too_long_requests(mini):
    engine = LLMEngine(mini, EngineConfig(block_size=4, num_blocks=40))
    prompt = mini.build_prompt("What is the opposite of up?")
    with pytest.raises(InputError, match="KV cache"):
        engine.add_request("big", prompt, SamplingParams(max_new_tokens=400))
    engine.add_request("a", prompt, SamplingParams(max_new_tokens=20))
    engine.add_request("b", prompt, SamplingParams(max_new_tokens=5))
    engine.step()
    assert engine.abort("a") and not engine.abort("a")
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free == 40


def test_engine_flash_and_moe(tokenizer):
    for name in ("mini", "mini-moe"):
        cm = random_chat_model(name, tokenizer)
        img = generate("hires", 2**48 + 5).images[0]
        prompts = [cm.build_prompt("Describe the image.", [img]), cm.build_prompt("Count the circles.")]
        flash = (0.5, 0.0) if name == "mini" else None
        engine = LLMEngine(cm)
        params = SamplingParams(max_new_tokens=6)
        for p in prompts:
            engine.add_request(str(len(engine.scheduler)), p, params, flash=flash)
        outs = {}
        while engine.has_unfinished():
            for o in engine.step():
                outs.setdefault(o.request_id, []).extend(t for t in o.token_ids if t not in cm.stop_ids)
        assert [outs["0"], outs["1"]] == [chat_ids(cm, p, params, flash) for p in prompts]
        if flash:  # the router compressed some tiles: fewer tokens than the uncompressed prompt
            assert len(engine.encode(prompts[0], flash).input_ids) < len(prompts[0].input_ids)


def test_identical_requests_finish_and_abort_independently(mini):
    # requests with the same prompt and image (equal ids, spans and feature values, equal parameters)
    s = generate("counting", 2**48 + 31)
    prompt = mini.build_prompt(s.question, s.images)
    engine = LLMEngine(mini)
    for rid in "abc":
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.step()
    assert engine.abort("b")
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert sorted(finished) == ["a", "c"] and engine.block_manager.num_free == engine.num_blocks


@pytest.mark.parametrize("pack", [False, True])
def test_compiled_decode_steps_match_eager(mini, pack):
    """Steps of single new tokens through torch.compile (dynamic batch size and context length) give
    the eager engine's tokens; `warmup` compiles the graphs before serving, so requests compile
    nothing. With packed weights the graphs call the packed products."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    import internvl35

    cm = internvl35.load("mini", compile=True, pack_weights=pack)
    engine = LLMEngine(cm, EngineConfig(block_size=8, max_num_seqs=8))
    before = counters["stats"]["unique_graphs"]
    engine.warmup()
    assert counters["stats"]["unique_graphs"] == before + 2  # one sequence; 2..8 sequences
    assert engine.stats["requests_finished"] == 0  # the warm-up leaves no trace in the metrics
    prompts = mixed_prompts(cm, 10)
    params = [SamplingParams(max_new_tokens=4 + 3 * (i % 4)) for i in range(len(prompts))]
    with profile() as prof:
        got = engine.generate(prompts, params)  # 10 requests, 8 at a time: decode batches of 8 down to 1
    assert counters["stats"]["unique_graphs"] == before + 2
    assert got == LLMEngine(mini, EngineConfig(block_size=8)).generate(prompts, params)
    ops = {e.name for e in prof.events()}
    assert ("internvl35::packed_linear" in ops) == pack
    assert DECODE_OP in ops  # compiled steps call the eager attention
