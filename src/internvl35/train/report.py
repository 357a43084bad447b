"""Training output: a rich progress bar (loss, tokens/s, ETA), metrics.jsonl, and loss.png."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsLog:
    def __init__(self, out: Path, total_steps: int, active: bool = True) -> None:
        self.out, self.active = out, active
        self.path = out / "metrics.jsonl"
        self.progress = None
        if active:
            self.progress = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("loss {task.fields[loss]:.4f}"),
                                     TextColumn("{task.fields[tok_s]:.0f} tok/s"),
                                     TextColumn("mfu {task.fields[mfu]:.1%}"),
                                     TimeElapsedColumn(), TimeRemainingColumn())
            self.progress.start()
            done = self._done_steps()
            self.task = self.progress.add_task("train", total=total_steps, completed=done, stage="",
                                               loss=float("nan"), tok_s=0.0, mfu=0.0)

    def _done_steps(self) -> int:
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    def step(self, step: int, **m) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        self.progress.update(self.task, completed=step, stage=m["stage"], loss=m["loss"], tok_s=m["tok_s"],
                             mfu=m["mfu"])

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows: dict[int, dict] = {}
        for line in self.path.read_text().splitlines():
            r = json.loads(line)
            rows[r["step"]] = r  # a resumed run rewrites the steps after its checkpoint
        return [rows[k] for k in sorted(rows)]

    def plot(self) -> None:
        if self.active:
            plot_loss(self.records(), self.out / "loss.png")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def plot_loss(rows: list[dict], path: Path, w: int = 800, h: int = 400) -> None:
    """Loss against step (with a moving average) drawn with Pillow."""
    if len(rows) < 2:
        return
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pad = 50
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1
    X = lambda s: pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (w - 2 * pad)  # noqa: E731
    Y = lambda v: h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)  # noqa: E731
    d.line([(X(s), Y(v)) for s, v in zip(steps, losses)], fill=(180, 200, 230))
    k = max(1, len(rows) // 50)
    avg = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    d.line([(X(s), Y(v)) for s, v in zip(steps, avg)], fill=(20, 60, 200), width=2)
    d.rectangle((pad, pad, w - pad, h - pad), outline="black")
    d.text((pad, 10), f"training loss (steps {steps[0]}-{steps[-1]})", fill="black")
    d.text((5, pad - 5), f"{hi:.3f}", fill="black")
    d.text((5, h - pad - 5), f"{lo:.3f}", fill="black")
    for r in rows[1:]:
        if r.get("stage") != rows[rows.index(r) - 1].get("stage"):
            d.line([(X(r["step"]), pad), (X(r["step"]), h - pad)], fill=(200, 80, 80))
    img.save(path)
