"""Generation: batching with left padding, streaming, sampling, stop tokens, multi-turn."""

import torch

import internvl35
from internvl35.generate import generate_stream
from internvl35.sampling import SamplingParams, sample_next


def test_batched_left_padding_equals_single(tiny_ckpt, image):
    m = internvl35.load(tiny_ckpt)
    qs = ["Describe the image.", "What color is the circle in this picture?", "Hi"]
    ims = [[image], [image, image], []]
    singles = [m.chat(q, im, max_new_tokens=12) for q, im in zip(qs, ims)]
    assert m.batch_chat(qs, ims, max_new_tokens=12) == singles


def test_stream_concatenates_to_chat(tiny_ckpt, image):
    m = internvl35.load(tiny_ckpt)
    pieces = list(m.stream_chat("Describe the image.", [image], max_new_tokens=16))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == m.chat("Describe the image.", [image], max_new_tokens=16)


def test_sampling_seeded_and_varied(tiny_ckpt):
    m = internvl35.load(tiny_ckpt)
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50)
    a = m.chat("Hi", seed=1, **kw)
    assert a == m.chat("Hi", seed=1, **kw)
    assert len({m.chat("Hi", seed=s, **kw) for s in range(2, 6)}) > 1


def test_stop_token_ends_generation(tiny_ckpt):
    m = internvl35.load(tiny_ckpt)
    p = m.build_prompt("Hi")
    first = next(generate_stream(m.model, [p.input_ids], SamplingParams(max_new_tokens=4), set()))[0]
    steps = list(generate_stream(m.model, [p.input_ids], SamplingParams(max_new_tokens=50), {first}))
    assert steps == [[first]]


def test_top_k_top_p_filtering():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_k=2), g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.5), g)) for _ in range(100)}
    assert draws == {0}


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.9]])
    seen = torch.tensor([[0]])
    assert int(sample_next(logits, SamplingParams(), None, seen)) == 0
    assert int(sample_next(logits, SamplingParams(repetition_penalty=1.2), None, seen)) == 1


def test_multi_turn_history(tiny_ckpt, image):
    m = internvl35.load(tiny_ckpt)
    a1, hist = m.chat("Describe the image.", [image], max_new_tokens=6, return_history=True)
    assert hist[0][0].startswith("<image>\n")
    p = m.build_prompt("And now?", [image], history=hist)
    assert p.text.count("<img>") == 1 and "Describe the image." in p.text and p.text.endswith("assistant\n")
    a2 = m.chat("And now?", [image], history=hist, max_new_tokens=6)
    assert isinstance(a2, str)


def test_thinking_uses_reasoning_system_prompt(tiny_ckpt):
    m = internvl35.load(tiny_ckpt)
    assert "<think>" in m.build_prompt("2+2?", thinking=True).text
    assert "<think>" not in m.build_prompt("2+2?").text


def test_compiled_decode_matches_eager(tiny_ckpt, image, monkeypatch):
    """The torch.compile decode step (static shapes, masked full-length cache) gives the eager tokens,
    also for a left-padded batch and across two prompt lengths sharing one cache bucket."""
    from torch._dynamo.utils import counters
    monkeypatch.setenv("INTERNVL35_NATIVE", "0")  # single prompts too through torch (not the C step)
    eager, compiled = internvl35.load(tiny_ckpt), internvl35.load(tiny_ckpt, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    q = ["Describe the image.", "What color is the circle in this picture?"]
    assert compiled.chat(q[0], [image], max_new_tokens=10) == eager.chat(q[0], [image], max_new_tokens=10)
    assert compiled.chat(q[1], [image], max_new_tokens=10) == eager.chat(q[1], [image], max_new_tokens=10)
    assert compiled.batch_chat(q, [[image], []], max_new_tokens=8) == eager.batch_chat(q, [[image], []],
                                                                                       max_new_tokens=8)
    assert counters["stats"]["unique_graphs"] > graphs  # the steps did go through torch.compile


def test_interleaved_compiled_generations_keep_their_graphs(tiny_ckpt, monkeypatch):
    """A generation's later compiled steps skip dynamo's full guard checks (the first step made
    them). Steps of other generations in between, of another model (other shapes) and another batch
    size, must not lead it to a graph that is not its own: every stream equals its eager tokens."""
    monkeypatch.setenv("INTERNVL35_NATIVE", "0")  # single prompts too through torch (not the C step)
    tiny, mini = internvl35.load(tiny_ckpt, compile=True), internvl35.load("mini", compile=True)
    jobs = []
    for cm, qs in ((tiny, ["Describe the image."]), (tiny, ["Hi", "What color is the circle?"]),
                   (mini, ["How many shapes are there?"])):
        prompts = [cm.build_prompt(q).input_ids for q in qs]
        jobs.append((cm, prompts))
    params = SamplingParams(max_new_tokens=8)
    eager = [list(generate_stream(cm.model, p, params, set())) for cm, p in jobs]
    streams = [generate_stream(cm.model, p, params, set(), compile=True) for cm, p in jobs]
    got = [[] for _ in jobs]
    for _ in range(params.max_new_tokens):
        for out, s in zip(got, streams):  # one step of each generation in turn
            out.append(next(s))
    assert got == eager


def test_argmax_rows_equals_argmax():
    """The blocked argmax gives torch's first-maximum index: ties across and within blocks, the max
    in a short last block, -inf and NaN entries, and vocabularies too small to block."""
    from internvl35.sampling import argmax_rows
    g = torch.Generator().manual_seed(0)
    for V in (151936, 5000, 3 * 1024, 1500, 7):
        x = torch.randn(6, V, generator=g)
        x[1, V // 3] = x[1, V - 1] = 50.0  # a tie across blocks: the first wins
        x[2, V - 1] = 60.0  # the max in the last (maybe short) block
        x[3, :] = 1.0  # all equal
        x[4, : V // 2] = float("-inf")
        x[5, V // 2] = float("nan")
        assert torch.equal(argmax_rows(x), x.argmax(-1)), V
