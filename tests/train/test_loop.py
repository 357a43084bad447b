"""The training loop on the mini world: loss falls, response-only labels, square weights, and a run
killed with SIGKILL resumes onto exactly the same loss curve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from internvl35.data.sft import IGNORE, ImageSettings, tokenize_record
from internvl35.data.template import get_template
from internvl35.train.losses import square_weights

FAST_MODEL = "mini"
FAST_OVERRIDES = {"vision": {"image_size": 112}}  # 16 tokens per tile: the loop, not the recipe, is tested


DENSE = {"name": "vision", "objective": "dense", "batch_tiles": 6, "lr": 2e-3, "warmup_steps": 1,
         "data": [{"source": "world", "families": {"attributes": 1, "counting": 1, "text": 1}}]}


def _config(tmp: Path, tokenizer_dir: Path, steps: int, dense_steps: int = 0, **extra) -> Path:
    cfg = {"out_dir": str(tmp / "run"), "model": FAST_MODEL, "model_overrides": FAST_OVERRIDES, "tokenizer": str(tokenizer_dir), "max_tokens": 512,
           "grad_accum": 2, "save_every": 5, "threads": 1,
           "stages": [{"name": "a", "steps": 4, "lr": 2e-3, "warmup_steps": 1,
                       "data": [{"source": "world", "families": {"attributes": 1}}]},
                      {"name": "b", "steps": steps - 4, "lr": 1e-3, "warmup_steps": 1,
                       "data": [{"source": "world", "families": {"attributes": 1, "text_only": 1}}]}],
           **extra}
    if dense_steps:
        cfg["stages"].insert(0, {**DENSE, "steps": dense_steps})
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run)}


def _train_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "internvl35.train", str(cfg)]


def test_response_only_labels(tokenizer):
    rec = {"conversations": [{"from": "human", "value": "What color is the circle?"},
                             {"from": "gpt", "value": "red"}]}
    s = ImageSettings(112, 1, 16)
    import random
    ex = tokenize_record(rec, tokenizer, get_template("internvl2_5"), s, random.Random(0))
    trained = [i for i, l in zip(ex.input_ids, ex.labels) if l != IGNORE]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "red<|im_end|>"
    assert tokenizer.decode(ex.input_ids, skip_special_tokens=False).endswith("assistant\nred<|im_end|>\n")


def test_model_overrides_change_nested_preset_fields():
    from internvl35.config import get_config

    base = get_config("mini")
    cfg = get_config("mini", vision={"image_size": 112}, text={"vocab_size": 300}, max_dynamic_patch=2)
    assert (cfg.vision.image_size, cfg.text.vocab_size, cfg.max_dynamic_patch) == (112, 300, 2)
    assert cfg.vision.hidden_size == base.vision.hidden_size and cfg.num_image_token == 16


def test_flop_weights_follow_freezing():
    """Throughput as a fraction of the peak counts what a stage computes: no backward for a frozen
    ViT, activation gradients only for a frozen LLM below a trained ViT."""
    from internvl35.config import get_config
    from internvl35.models.internvl import InternVLModel
    from internvl35.train.loop import flop_weights, freeze

    model = InternVLModel(get_config("mini", text={"vocab_size": 300}))
    llm = sum(q.numel() for n, q in model.language_model.named_parameters() if "embed_tokens" not in n)
    vit = sum(q.numel() for q in model.vision_model.parameters())
    for parts, want in (([], (6, 6)), (["vision"], (6, 2)), (["llm"], (4, 6)), (["vision", "llm"], (4, 2)),
                        (["vision", "projector", "llm"], (2, 2))):
        freeze(model, parts)
        assert flop_weights(model) == (want[0] * llm, want[1] * vit), parts


def test_square_weights():
    labels = torch.tensor([0, 5, 5, 5, 5, IGNORE, 7])  # example 0 has 4 targets, example 1 has 1
    segments = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    w = square_weights(labels, segments)
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0]))


def test_loss_falls_and_sigkill_resume_is_exact(tmp_path, tok_dir):
    steps = 14
    ref_cfg = _config(tmp_path / "ref", tok_dir, steps)
    subprocess.run(_train_cmd(ref_cfg), check=True, capture_output=True)
    ref = _losses(tmp_path / "ref" / "run")
    assert len(ref) == steps
    assert sum(list(ref.values())[-3:]) / 3 < 0.7 * sum(list(ref.values())[:3]) / 3

    cfg = _config(tmp_path / "kill", tok_dir, steps)
    run = tmp_path / "kill" / "run"
    p = subprocess.Popen(_train_cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill after the step-5 checkpoint, mid-way to the next one
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 7:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert 7 <= len(_losses(run)) < steps
    subprocess.run(_train_cmd(cfg), check=True, capture_output=True)
    got = _losses(run)
    assert list(got) == list(ref)
    assert all(abs(got[k] - ref[k]) < 1e-6 for k in ref), (got, ref)
    assert (run / "loss.png").is_file() and (run / "checkpoint" / "model.safetensors").is_file()


def _heldout(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("heldout_")} for r in _metrics(run)}


def test_dense_vision_stage_learns_and_sigkill_resume_is_exact(tmp_path, tok_dir):
    # the dense warm-up has its own heads and optimizer: both must survive a kill mid-stage, and
    # the held-out measurements (eval_every) must not move the training RNG or data
    ref_cfg = _config(tmp_path / "ref", tok_dir, 4, dense_steps=10, save_every=4, eval_every=3)
    subprocess.run(_train_cmd(ref_cfg), check=True, capture_output=True)
    ref = _losses(tmp_path / "ref" / "run")
    dense = [ref[k] for k in range(1, 11)]
    assert sum(dense[-3:]) / 3 < 0.8 * sum(dense[:3]) / 3

    held = _heldout(tmp_path / "ref" / "run")
    assert [k for k, v in held.items() if v] == [3, 6, 9, 12]
    assert {"heldout_color", "heldout_shape", "heldout_centers"} <= set(held[9])
    assert set(held[12]) == {"heldout_loss"}
    assert held[9]["heldout_color"] > held[3]["heldout_color"]  # the heads learn what they are measured on

    cfg = _config(tmp_path / "kill", tok_dir, 4, dense_steps=10, save_every=4, eval_every=3)
    run = tmp_path / "kill" / "run"
    p = subprocess.Popen(_train_cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # after the step-4 checkpoint, before the step-8 one
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= 6:
            break
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert 6 <= len(_losses(run)) < 8
    subprocess.run(_train_cmd(cfg), check=True, capture_output=True)
    got = _losses(run)
    assert list(got) == list(ref)
    assert all(abs(got[k] - ref[k]) < 1e-6 for k in ref), (got, ref)
    assert _heldout(run) == held


def test_resume_at_a_stage_boundary_starts_the_next_stage_fresh(tmp_path, tok_dir):
    # A recipe grown by a stage: the first run ends exactly at the boundary; resuming with the longer
    # recipe must give the next stage a fresh optimizer and schedule, as an uninterrupted run does.
    steps = 8
    ref_cfg = _config(tmp_path / "ref", tok_dir, steps, save_every=100)
    subprocess.run(_train_cmd(ref_cfg), check=True, capture_output=True)
    ref = _losses(tmp_path / "ref" / "run")
    full = _config(tmp_path / "grow", tok_dir, steps, save_every=100)
    first = yaml.safe_load(full.read_text())
    first["stages"] = first["stages"][:1]
    short = tmp_path / "grow" / "short.yaml"
    short.write_text(yaml.safe_dump(first))
    subprocess.run(_train_cmd(short), check=True, capture_output=True)
    subprocess.run(_train_cmd(full), check=True, capture_output=True)
    got = _losses(tmp_path / "grow" / "run")
    assert list(got) == list(ref)
    assert all(abs(got[k] - ref[k]) < 1e-6 for k in ref), (got, ref)


def test_two_process_fsdp_matches_one_process(tmp_path, tok_dir):
    steps = 6
    one = _config(tmp_path / "one", tok_dir, steps, dense_steps=2, save_every=100)
    subprocess.run(_train_cmd(one), check=True, capture_output=True)
    two = _config(tmp_path / "two", tok_dir, steps, dense_steps=2, save_every=100)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import socket
    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        "--master_addr=127.0.0.1", f"--master_port={port}",
                        "-m", "internvl35.train", str(two)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "one" / "run"), _losses(tmp_path / "two" / "run")
    assert list(a) == list(b)
    assert all(abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) for k in a), (a, b)
    import internvl35
    m1, m2 = (internvl35.load(tmp_path / d / "run" / "checkpoint") for d in ("one", "two"))
    # Reduction order differs between 1 and 2 processes; Adam turns float noise in near-zero gradients
    # into updates of up to ~lr, so a few elements may differ by up to the learning rate (5.2e-4
    # measured on one CPU, under 2e-4 on another). Bound how many differ beyond float noise (a wrong
    # gradient reduction moves nearly all of them; measured here: 0.014% of all elements, single
    # ones scattered over the tensors), the largest difference by the largest learning rate, and
    # the mean tightly.
    diffs = [(p1 - p2).detach().abs() for p1, p2 in zip(m1.model.parameters(), m2.model.parameters())]
    assert max(float(d.max()) for d in diffs) < DENSE["lr"]
    assert sum(int((d > 1e-5).sum()) for d in diffs) / sum(d.numel() for d in diffs) < 1e-3
    assert sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs) < 1e-7
