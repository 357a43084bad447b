"""Turn a training checkpoint into the embedded mini model: bf16 custom-format weights, tokenizer,
and a model card with the recipe, the command that reproduces it, and the measured eval table.

    python -m internvl35.train.publish runs/mini/checkpoint src/internvl35/assets/mini [--n 100]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from internvl35.chat import load
from internvl35.eval.runner import run_suite
from internvl35.weights.convert import write_checkpoint


def model_card(report: dict, alt: dict, state: dict, recipe: str) -> str:
    rows = "\n".join(f"| {k} | {v:.1%} |" for k, v in report["accuracy"].items())
    alt_rows = "\n".join(f"| {k} | {v:.1%} |" for k, v in alt["accuracy"].items())
    return f"""# InternVL3.5-mini

The InternVL3.5 architecture at a tiny size (see the `mini` preset), trained from scratch on this
package's procedural mini world on a 2-core CPU. It is the default model of every command.

Trained for {state.get('step')} optimizer steps. Reproduce with `make train-mini`, which runs
`internvl35 train configs/mini.yaml` and then this publishing step.

## Held-out evaluation (greedy, {report['n']} samples per row, `internvl35 eval --suite mini`)

| task | accuracy |
|---|---|
{rows}
| **overall** | **{report['overall']:.1%}** |

## Other renderer (font, rasteriser and background never seen in training; `--suite mini-alt`)

| task | accuracy |
|---|---|
{alt_rows}
| **overall** | **{alt['overall']:.1%}** |

## Recipe (configs/mini.yaml)

```yaml
{recipe.strip()}
```
"""


def publish(src: Path, dst: Path, n: int = 100, recipe: Path = Path("configs/mini.yaml")) -> dict:
    model = load(src)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(model.model, model.tokenizer, tmp, "custom", torch.bfloat16)
    packed = load(tmp)
    report = run_suite(packed, "mini", n)
    alt = run_suite(packed, "mini-alt", max(10, n // 2))
    state = json.loads((src / "train_state.json").read_text()) if (src / "train_state.json").is_file() else {}
    (tmp / "README.md").write_text(model_card(report, alt, state, recipe.read_text() if recipe.is_file() else ""))
    (tmp / "eval.json").write_text(json.dumps({"mini": report, "mini-alt": alt}, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return report


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--n", type=int, default=100)
    a = ap.parse_args()
    r = publish(a.src, a.dst, a.n)
    print(json.dumps(r["accuracy"], indent=2), f"overall {r['overall']:.3f}")
