"""JSONL conversation data: records with image paths relative to a root, reshuffled every pass."""

import json

from PIL import Image

from internvl35.data.sft import IGNORE, ImageSettings
from internvl35.data.template import get_template
from internvl35.train.config import DataSource, Stage
from internvl35.config import CONFIGS
from internvl35.data.tokenizer import train_bpe
from internvl35.train.data import ExampleSource, world_corpus


def test_jsonl_source_covers_every_record_each_pass(tmp_path, tokenizer):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (112, 112), (200, 0, 0)).save(tmp_path / "img" / "a.png")
    answers = ["red", "blue", "green"]
    lines = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                 {"from": "gpt", "value": a}]} for a in answers]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    stage = Stage(data=[DataSource(source="jsonl", path=str(tmp_path / "d.jsonl"), root=str(tmp_path / "img"),
                                   jpeg_augment=True)])
    src = ExampleSource(stage, tokenizer, get_template("internvl2_5"), ImageSettings(112, 1, 16), seed=0)

    def answer(idx):
        ex = src.example(idx)
        assert ex.pixel_values.shape == (1, 3, 112, 112)
        return tokenizer.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])

    first, second = [answer(i) for i in range(3)], [answer(i) for i in range(3, 6)]
    assert sorted(first) == sorted(second) == sorted(answers)
    assert first == [answer(i) for i in range(3)]  # deterministic by index

    # Mixed with a world source, the JSONL source still makes exact passes over its own draws.
    stage.data.append(DataSource(source="world", families={"text_only": 1.0}))
    src = ExampleSource(stage, tokenizer, get_template("internvl2_5"), ImageSettings(112, 1, 16), seed=0)
    drawn = [answer(i) for i in range(40) if src._pick(i)[1] == 0]
    assert len(drawn) >= 9
    for p in range(len(drawn) // 3):
        assert sorted(drawn[3 * p:3 * p + 3]) == sorted(answers)
    assert answer(next(i for i in range(40) if src._pick(i)[1] == 0)) == drawn[0]  # read backwards: same


def test_world_followups_become_trained_turns(tokenizer):
    import random

    from internvl35.data.sft import tokenize_record, world_record

    rec = world_record("text", 3, followups=True)
    assert len(rec["conversations"]) == 2 * 4
    ex = tokenize_record(rec, tokenizer, get_template("internvl2_5"), ImageSettings(112, 1, 16), random.Random(0))
    trained = tokenizer.decode([i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE],
                               skip_special_tokens=False)
    assert trained.count("<|im_end|>") == 4
    assert len(world_record("text", 3)["conversations"]) == 2


def test_world_tokenizer_keeps_the_prompt_header_short():
    """Every example repeats the system message and role names, so the world's BPE must learn them
    as whole tokens (weighted by frequency they are; trained once each they were 33 tokens)."""
    tok = train_bpe(world_corpus(n_per_family=40), 1024)
    assert len(tok.encode("assistant\n")) <= 2
    assert len(tok.encode("system\n" + CONFIGS["mini"].system_message)) <= 9


def test_worker_processes_give_the_stream_of_one_process(tokenizer):
    """Examples computed ahead by worker processes come back in order and equal to in-process ones,
    for the language stream and for the dense vision batches (also when a batch restarts elsewhere)."""
    import torch

    stage = Stage(data=[DataSource(source="world", families={"attributes": 1.0, "counting": 1.0})])
    args = (stage, tokenizer, get_template("internvl2_5"), ImageSettings(112, 2, 16), 0)
    one, many = ExampleSource(*args), ExampleSource(*args, workers=2)
    try:
        for (i, a), (j, b) in zip(one.stream(3), many.stream(3)):
            assert i == j and a.input_ids == b.input_ids and torch.equal(a.pixel_values, b.pixel_values)
            if i == 9:
                break
        nxt = 0
        for restart in (False, False, True):  # continue where the last batch stopped, then jump back
            start = 2 if restart else nxt
            nxt, x, y = one.dense_batch(start, 6)
            got = many.dense_batch(start, 6)
            assert got[0] == nxt and torch.equal(got[1], x) and torch.equal(got[2], y)
    finally:
        many.close()
