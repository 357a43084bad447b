"""Regenerates the bundled example images and questions.json from held-out mini-world seeds."""

import json
from pathlib import Path

from internvl35.data.world import generate

HERE = Path(__file__).parent
PICKS = [("attributes", 0), ("counting", 3), ("spatial", 1), ("text", 2), ("grounding", 0), ("charts", 1)]


def main() -> None:
    items = []
    for family, i in PICKS:
        s = generate(family, 2**49 + i)
        name = f"{family}.png"
        s.images[0].save(HERE / name)
        items.append({"image": name, "question": s.question, "expected": s.answer})
    (HERE / "questions.json").write_text(json.dumps(items, indent=2))


if __name__ == "__main__":
    main()
