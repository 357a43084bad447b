"""The embedded mini model: present, small, loadable by name, and answering held-out questions
better than chance (the full per-family table is in its model card)."""

from __future__ import annotations

import json


from internvl35.data.world import generate, is_correct
from internvl35.weights.locate import MINI_DIR


def test_mini_is_embedded_and_small():
    assert (MINI_DIR / "config.json").is_file() and (MINI_DIR / "README.md").is_file()
    size = sum(f.stat().st_size for f in MINI_DIR.iterdir())
    assert size <= 50 * 2**20


def test_default_model_answers_colours_above_chance(mini):
    # 8 colours / 4 shapes: chance is at most 25%; the model card reports the full held-out table
    n = 30
    correct = sum(is_correct(s, mini.chat(s.question, s.images, max_new_tokens=8))
                  for s in (generate("attributes", 2**48 + i) for i in range(n)))
    assert correct / n >= 0.4


def test_model_card_table_matches_eval_json():
    report = json.loads((MINI_DIR / "eval.json").read_text())["mini"]
    card = (MINI_DIR / "README.md").read_text()
    assert f"{report['overall']:.1%}" in card
