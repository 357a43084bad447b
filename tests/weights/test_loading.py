"""Checkpoint loading: sharding, legacy HF names, and a clear error for every bad input."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import internvl35
from internvl35.errors import CheckpointError, UnsupportedArchitectureError
from internvl35.models.internvl import InternVLModel
from internvl35.weights.convert import write_checkpoint
from internvl35.weights.loader import INDEX, save_weights
from tests.conftest import randomize_, tiny_config, write_tiny

WEIGHTS = "model.safetensors"


def _logits(m, image):
    p = m.build_prompt("Describe.", [image], max_tiles=2)
    return m(torch.tensor([p.input_ids]), pixel_values=p.pixel_values)


def _edit(path, fn):
    sd = load_file(path / WEIGHTS)
    fn(sd)
    save_file(sd, path / WEIGHTS)


def test_sharded_checkpoint_loads_identically(tmp_path, tokenizer, image, tiny_ckpt):
    m = internvl35.load(tiny_ckpt)
    out = tmp_path / "sharded"
    write_checkpoint(m.model, tokenizer, out, "custom", torch.float32)
    (out / WEIGHTS).unlink()
    files = save_weights(m.model, out, "custom", torch.float32, max_shard_bytes=200_000)
    assert len(files) > 2 and (out / INDEX).is_file()
    assert torch.equal(_logits(m, image), _logits(internvl35.load(out), image))


def test_bf16_storage_is_cast_to_compute_dtype(tmp_path, tokenizer, image):
    torch.manual_seed(0)
    model = InternVLModel(tiny_config(tokenizer.vocab_size))
    randomize_(model)
    write_checkpoint(model, tokenizer, tmp_path / "bf16", "custom", torch.bfloat16)
    m = internvl35.load(tmp_path / "bf16")
    assert m.dtype == torch.float32
    assert internvl35.load(tmp_path / "bf16", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_legacy_hf_key_layout(tmp_path, tokenizer, image):
    src = write_tiny(tmp_path / "hf", tokenizer, fmt="hf")
    ref = _logits(internvl35.load(src), image)

    def legacy(sd):
        for k in list(sd):
            new = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
            new = new.replace("model.multi_modal_projector.", "multi_modal_projector.")
            sd[new] = sd.pop(k)
    _edit(src, legacy)
    assert torch.equal(ref, _logits(internvl35.load(src), image))


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.pop("mlp1.1.weight"), r"missing from checkpoint: mlp1\.1\.weight"),
    (lambda sd: sd.update(extra=torch.zeros(2)), r"unexpected key\(s\) in checkpoint: extra"),
    (lambda sd: sd.update({"mlp1.1.bias": torch.zeros(3)}), r"shape mismatch for mlp1\.1\.bias: checkpoint \[3\], model expects \[64\]"),
])
def test_bad_weights(tiny_ckpt, edit, message):
    _edit(tiny_ckpt, edit)
    with pytest.raises(CheckpointError, match=message):
        internvl35.load(tiny_ckpt)


def test_truncated_file(tiny_ckpt):
    f = tiny_ckpt / WEIGHTS
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        internvl35.load(tiny_ckpt)


def _set_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        target = raw
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    (path / "config.json").write_text(json.dumps(raw))


def test_unknown_architecture(tiny_ckpt):
    _set_config(tiny_ckpt, model_type="llava", architectures=["LlavaForConditionalGeneration"])
    with pytest.raises(UnsupportedArchitectureError, match="unknown architecture"):
        internvl35.load(tiny_ckpt)


def test_gpt_oss_not_supported_yet(tiny_ckpt):
    _set_config(tiny_ckpt, **{"llm_config.model_type": "gpt_oss"})
    with pytest.raises(UnsupportedArchitectureError, match="not supported yet"):
        internvl35.load(tiny_ckpt)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "internvl35.cli", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line(tiny_ckpt):
    _edit(tiny_ckpt, lambda sd: sd.pop("mlp1.1.weight"))
    r = _cli("info", str(tiny_ckpt))
    assert r.returncode == 0  # info reads headers only
    r = _cli("chat", "--model", str(tiny_ckpt), "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "missing from checkpoint" in r.stderr
    r = _cli("--debug", "chat", "--model", str(tiny_ckpt), "hi")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = _cli("chat", "--model", str(tiny_ckpt.parent / "nope"), "hi")
    assert r.returncode == 1 and "not a checkpoint directory" in r.stderr
