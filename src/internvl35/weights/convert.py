"""Format conversion between the custom (GitHub) and `-HF` checkpoint layouts: config, weights
(through the key map) and tokenizer files. The model is held once, in the storage dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from internvl35.data.image import IMAGENET_MEAN, IMAGENET_STD
from internvl35.data.tokenizer import Tokenizer
from internvl35.errors import InputError
from internvl35.weights.config_json import config_from_dict, config_to_dict, read_config_json
from internvl35.weights.loader import INDEX, load_weights, save_weights
from internvl35.weights.safetensors_stream import SafetensorsReader

_SKIP = {"config.json", INDEX, "processor_config.json", "preprocessor_config.json"}


def storage_dtype(path: Path) -> torch.dtype:
    """The floating dtype the checkpoint stores (bf16 for released models)."""
    from internvl35.weights.loader import weight_files

    entries = SafetensorsReader(weight_files(path)[0]).entries.values()
    return next((e.dtype for e in entries if e.dtype.is_floating_point), torch.bfloat16)


def write_checkpoint(model, tokenizer: Tokenizer, out: Path, fmt: str, dtype: torch.dtype,
                     params: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + weights + tokenizer files (+ processor files for HF) in format `fmt`."""
    cfg = model.cfg
    out.mkdir(parents=True, exist_ok=True)
    raw = config_to_dict(cfg, fmt, image_token_id=tokenizer.img_context_id, eos_id=tokenizer.im_end_id)
    (out / "config.json").write_text(json.dumps(raw, indent=2, ensure_ascii=False))
    save_weights(model, out, fmt, dtype, params=params)
    tokenizer.save(out)
    if fmt == "hf":
        S = cfg.vision.image_size
        (out / "processor_config.json").write_text(json.dumps(
            {"image_seq_length": cfg.num_image_token, "processor_class": "InternVLProcessor"}, indent=2))
        (out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "GotOcr2ImageProcessorFast", "crop_to_patches": True,
            "min_patches": cfg.min_dynamic_patch, "max_patches": cfg.max_dynamic_patch,
            "size": {"height": S, "width": S}, "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD), "do_convert_rgb": True, "processor_class": "InternVLProcessor"},
            indent=2))


def convert(src: Path, dst: Path, to: str, dtype: torch.dtype | None = None) -> None:
    """Rewrite checkpoint `src` in format `to` ("hf" or "custom") under `dst`."""
    if to not in ("hf", "custom"):
        raise InputError(f"--to must be 'hf' or 'custom', got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise InputError(f"{dst} exists and is not empty")
    cfg, fmt = config_from_dict(read_config_json(src), name=src.name)
    dtype = dtype or storage_dtype(src)
    model = load_weights(src, cfg, fmt, dtype)
    tokenizer = Tokenizer.from_dir(src)
    write_checkpoint(model, tokenizer, dst, to, dtype)
    for f in src.iterdir():  # chat templates, model cards, generation config, ...
        if f.is_file() and f.name not in _SKIP and f.suffix != ".safetensors" and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
