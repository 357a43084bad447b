"""Runs a suite: greedy answers for held-out samples, scored per family; a rich table and JSON.

Held-out means seeds >= 2**48: training draws its world seeds below that bound.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from internvl35.chat import ChatModel
from internvl35.data.template import THINKING_SYSTEM
from internvl35.data.world import EVAL_FAMILIES, Style, generate, is_correct
from internvl35.engine.llm_engine import LLMEngine
from internvl35.sampling import SamplingParams

HELD_OUT = 2**48


@dataclass(frozen=True)
class Task:
    name: str  # row in the table
    family: str
    style: Style = Style()
    max_tiles: int | None = None


SUITES: dict[str, list[Task]] = {
    "mini": [Task(f, f) for f in EVAL_FAMILIES] + [Task("hires@1tile", "hires", max_tiles=1)],
    "mini-alt": [Task(f"{f}/alt", f, Style(alt=True)) for f in EVAL_FAMILIES if f != "text_only"],
}


def run_suite(model: ChatModel, suite: str, n: int = 100, max_new_tokens: int = 64,
              families: list[str] | None = None, progress: bool = True) -> dict:
    """Greedy answers through the serving engine (its outputs equal `model.chat`'s token for token,
    and batching makes a suite several times faster)."""
    tasks = [t for t in SUITES[suite] if families is None or t.family in families]
    jobs = [(t, generate(t.family, HELD_OUT + i, t.style)) for t in tasks for i in range(n)]
    engine = LLMEngine(model)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for k, (t, s) in enumerate(jobs):
        kw = {"video": s.images} if s.video else {}
        prompt = model.build_prompt(s.question, [] if s.video else s.images, max_tiles=t.max_tiles,
                                    system=THINKING_SYSTEM if s.thinking else None, **kw)
        engine.add_request(str(k), prompt, params)
    tokens: dict[int, list[int]] = defaultdict(list)
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"eval {suite}", total=len(jobs))
        while engine.has_unfinished():
            for o in engine.step():
                tokens[int(o.request_id)] += [x for x in o.token_ids if x not in engine.stop_ids]
                bar.advance(task, o.finished)
    results: dict[str, list[bool]] = defaultdict(list)
    examples: dict[str, list[dict]] = defaultdict(list)
    for k, (t, s) in enumerate(jobs):
        pred = model.tokenizer.decode(tokens[k]).strip()
        ok = is_correct(s, pred)
        results[t.name].append(ok)
        if len(examples[t.name]) < 3:
            examples[t.name].append({"question": s.question, "answer": s.answer, "prediction": pred, "correct": ok})
    acc = {k: sum(v) / len(v) for k, v in results.items()}
    main = [k for k in acc if k in EVAL_FAMILIES or k.endswith("/alt")]
    return {"suite": suite, "n": n, "accuracy": acc,
            "overall": sum(acc[k] for k in main) / max(1, len(main)), "examples": examples}


def print_table(report: dict, console: Console | None = None) -> None:
    table = Table(title=f"suite {report['suite']} ({report['n']} samples per row)")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    for k, v in report["accuracy"].items():
        table.add_row(k, f"{v:.1%}")
    table.add_row("[bold]overall", f"[bold]{report['overall']:.1%}")
    (console or Console()).print(table)


def save_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))
