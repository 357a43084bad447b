"""`make demo`: asks the embedded mini model about the bundled images through the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    items = json.loads((HERE / "questions.json").read_text())
    for it in items:
        cmd = [sys.executable, "-m", "internvl35.cli", "chat", "--image", str(HERE / it["image"]), it["question"]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr.strip(), file=sys.stderr)
            return r.returncode
        print(f"image:    {it['image']}\nquestion: {it['question']}\nanswer:   {r.stdout.strip()}\n"
              f"expected: {it['expected']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
