"""The mini world: determinism, every family renders, checkers accept the reference and reject others."""

import numpy as np
import pytest

from internvl35.data.world import FAMILIES, Sample, Style, generate, is_correct
from internvl35.data.world.sample import iou


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_deterministic_and_checkable(family):
    a, b = generate(family, 7), generate(family, 7)
    assert a.question == b.question and a.answer == b.answer
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))
    assert is_correct(a, a.answer)
    assert not is_correct(a, "definitely not the answer")
    if family != "text_only":
        assert a.images and all(im.mode == "RGB" for im in a.images)


def test_families_vary_with_seed():
    for family in FAMILIES:
        assert len({generate(family, s).question + generate(family, s).answer for s in range(12)}) > 1


def test_required_phrasings_exist():
    qs = {f: {generate(f, s).question for s in range(200)} for f in ("attributes", "counting", "spatial", "text")}
    assert any(q.startswith("What color is the ") for q in qs["attributes"])
    assert any(q.startswith("How many ") and q.endswith("s are there?") for q in qs["counting"])
    assert any(q.startswith("Is the ") and " to the left of the " in q for q in qs["spatial"])
    assert "What is written in the image?" in qs["text"]
    counts = {generate("counting", s).answer for s in range(300)}
    assert counts == {str(i) for i in range(10)}


def test_grounding_iou_checker():
    s = generate("grounding", 3)
    assert s.question.startswith("Please provide the bounding box coordinate of the region this sentence "
                                 "describes: <ref>the ")
    x1, y1, x2, y2 = s.meta["box"]
    shifted = f"<ref>x</ref><box>[[{x1 + 1}, {y1 + 1}, {x2 + 1}, {y2 + 1}]]</box>"
    assert is_correct(s, shifted)
    far = f"[[{x2 + 10}, {y2 + 10}, {x2 + 50}, {y2 + 50}]]"
    assert not is_correct(s, far)
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


def test_thinking_answers_are_checked_on_the_final_part():
    s = Sample("arithmetic", "q", "<think>3 plus 4 is 7.</think>\n7", thinking=True)
    assert is_correct(s, "<think>whatever</think>\n7") and is_correct(s, "7") and not is_correct(s, "8")


def test_hires_needs_tiling_and_styles_differ():
    s = generate("hires", 0)
    assert max(s.images[0].size) >= 3 * min(s.images[0].size)
    a = np.asarray(generate("attributes", 0).images[0], dtype=float)
    b = np.asarray(generate("attributes", 0, Style(alt=True)).images[0], dtype=float)
    assert a.shape != b.shape or np.abs(a - b).mean() > 1


def test_followups_are_about_the_same_scene():
    text = generate("text", 4)
    spelled = dict(text.followups)["Spell the text in the image letter by letter."]
    assert spelled.replace(" ", "") == text.answer
    counting = generate("counting", 9)
    total = dict(counting.followups).get("How many objects are there in total?")
    assert total is None or int(total) >= int(counting.answer)
    ground = generate("grounding", 5)
    for q, a in ground.followups:  # the other objects, each with its own box
        assert q.endswith(a.split("<box>")[0]) and is_correct(Sample("grounding", q, a, meta={
            "box": [int(x) for x in a.split("[[")[1].rstrip("]</box>").split(",")]}), a)
    chart = generate("charts", 2)
    assert len(chart.followups) >= 3 and all(a.isdigit() for _, a in chart.followups)
