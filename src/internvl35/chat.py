"""`internvl35.load` and the object it returns: model + tokenizer + preprocessing, with `chat`.

This is the only place where text, images and the model meet for inference outside the engine:
it renders the template, tiles images, expands <IMG_CONTEXT>, applies Flash compaction and decodes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from internvl35.config import ModelConfig
from internvl35.data.image import EncodedImage, ImageLike, num_tiles, preprocess_image, tiles_to_tensor
from internvl35.data.template import THINKING_SYSTEM, attach_images, expand_image_tokens, get_template
from internvl35.data.tokenizer import Tokenizer
from internvl35.data.video import load_frames
from internvl35.errors import InputError
from internvl35.generate import generate_stream
from internvl35.hardware import check_device
from internvl35.models.internvl import InternVLModel, flash_keep_mask
from internvl35.models.qwen3 import bf16_copies_, fuse_projections_, pack_weights_
from internvl35.sampling import SamplingParams
from internvl35.weights.config_json import config_from_dict, read_config_json
from internvl35.weights.loader import load_weights
from internvl35.weights.locate import resolve_path


@dataclass
class Prompt:
    """One rendered request: token ids, its image tiles and how many tiles each image has."""

    question: str  # the question as placed in the template (with image placeholder lines)
    text: str
    input_ids: list[int]
    pixel_values: torch.Tensor | None
    tiles_per_image: list[int]
    # Images left in their file format for a vision server to decode and tile (pixel_values is None).
    deferred: list[EncodedImage] = field(default_factory=list)
    max_tiles: int = 0  # the tile limit `deferred` images are counted (and must be tiled) with


class ChatModel:
    def __init__(self, model: InternVLModel, tokenizer: Tokenizer, fmt: str = "custom", path: Path | None = None,
                 compile: bool = False):
        self.model, self.tokenizer, self.format, self.path = model, tokenizer, fmt, path
        self.compile = compile  # decode steps through torch.compile (see `generate_stream`)
        self.cfg: ModelConfig = model.cfg
        self.template = get_template(self.cfg.template)
        model.image_token_id = tokenizer.img_context_id
        self.stop_ids = {tokenizer.token_id(self.template.stop)}

    @property
    def _param(self) -> torch.Tensor:  # a materialised parameter (a decoupled half keeps the rest on meta)
        return next(p for p in self.model.parameters() if p.device.type != "meta")

    @property
    def device(self) -> torch.device:
        return self._param.device

    @property
    def dtype(self) -> torch.dtype:
        return self._param.dtype

    def __call__(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, **kw) -> torch.Tensor:
        """HF-style forward: ids with expanded <IMG_CONTEXT> tokens -> logits [B, L, V]."""
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device, self.dtype)
        return self.model(input_ids.to(self.device), pixel_values, **kw)

    # --- prompt building -----------------------------------------------------------------------
    def tile_limit(self, max_tiles: int | None = None) -> int:
        return (max_tiles or self.cfg.max_dynamic_patch) if self.cfg.dynamic_image_size else 1

    def image_tiles(self, images: list[ImageLike], max_tiles: int | None = None) -> list[torch.Tensor]:
        return [preprocess_image(im, self.cfg.vision.image_size, self.tile_limit(max_tiles), self.cfg.use_thumbnail)
                for im in images]

    def count_tiles(self, image: EncodedImage, max_tiles: int | None = None) -> int:
        """Tiles of an undecoded image, exactly as `image_tiles` would make them."""
        return num_tiles(image.width, image.height, self.cfg.vision.image_size, self.tile_limit(max_tiles),
                         self.cfg.use_thumbnail)

    def build_prompt(self, question: str, images: list[ImageLike] = (), video: str | Path | list | None = None,
                     history: list[tuple[str, str]] = (), thinking: bool = False, system: str | None = None,
                     max_tiles: int | None = None, num_frames: int = 8, decode_images: bool = True) -> Prompt:
        """Render the template with images or video frames; `<image>` placeholders in the history
        and question take the images in order (prepended to the question when there are none).
        `decode_images=False` leaves `EncodedImage`s undecoded (`Prompt.deferred`) for a vision server."""
        if images and video is not None:
            raise InputError("give images or a video, not both")
        S = self.cfg.vision.image_size
        deferred: list[EncodedImage] = []
        if video is not None:
            frames = load_frames(video, num_frames)
            tiles = [tiles_to_tensor([f], S) for f in frames]
        elif not decode_images and images:
            if not all(isinstance(im, EncodedImage) for im in images):
                raise TypeError("decode_images=False takes EncodedImage images only")
            deferred = list(images)
            tiles = []
        else:
            tiles = self.image_tiles(list(images), max_tiles)
        counts = [self.count_tiles(im, max_tiles) for im in deferred] or [t.shape[0] for t in tiles]
        try:
            question = attach_images(question, list(history), len(counts), video is not None)
        except ValueError as e:
            raise InputError(str(e)) from None
        if system is None:
            system = THINKING_SYSTEM if thinking else self.cfg.system_message
        text = self.template.render(question, list(history), system)
        text = expand_image_tokens(text, counts, self.cfg.num_image_token)
        pixel_values = torch.cat(tiles) if tiles else None
        return Prompt(question, text, self.tokenizer.encode(text), pixel_values, counts, deferred,
                      self.tile_limit(max_tiles))

    def decoded(self, prompt: Prompt) -> Prompt:
        """The prompt with its deferred images decoded and tiled here (same ids, same tiles)."""
        if not prompt.deferred:
            return prompt
        tiles = self.image_tiles(prompt.deferred, prompt.max_tiles)
        return dataclasses.replace(prompt, pixel_values=torch.cat(tiles), deferred=[])

    def flash_settings(self, flash: bool | None, relative: float | None, absolute: float | None
               ) -> tuple[float, float] | None:
        f = self.cfg.flash
        on = (f is not None and f.flash_mode) if flash is None else flash
        if not on:
            return None
        if f is None:
            raise InputError("this checkpoint has no Flash router (mlp2/gating); flash=True is not possible")
        return (f.relative_threshold if relative is None else relative,
                f.absolute_threshold if absolute is None else absolute)

    @torch.inference_mode()
    def encode(self, prompt: Prompt, flash: tuple[float, float] | None = None
               ) -> tuple[list[int], torch.Tensor | None]:
        """Run the vision side: -> (possibly Flash-compacted ids, image features [M, D])."""
        prompt = self.decoded(prompt)
        if prompt.pixel_values is None:
            return prompt.input_ids, None
        pv = prompt.pixel_values.to(self.device, self.dtype)
        feats, per_tile = self.model.encode_images(pv, flash)
        ids = prompt.input_ids
        if flash is not None:
            t = torch.tensor(ids)
            keep = flash_keep_mask(t, self.tokenizer.img_context_id, per_tile, self.cfg.num_image_token)
            ids = t[keep].tolist()
        return ids, feats

    # --- generation ----------------------------------------------------------------------------
    def _stream(self, prompt: Prompt, flash: tuple[float, float] | None, params: SamplingParams) -> Iterator[str]:
        self._check_length(len(prompt.input_ids) + params.max_new_tokens)
        ids, feats = self.encode(prompt, flash)
        out: list[int] = []
        sent = ""
        for step in generate_stream(self.model, [ids], params, self.stop_ids, feats, self.tokenizer.pad_id,
                                    self.compile):
            tok = step[0]
            if tok is None or tok in self.stop_ids:
                break
            out.append(tok)
            text = self.tokenizer.decode(out)
            if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
                yield text[len(sent):]
                sent = text
        text = self.tokenizer.decode(out)
        if len(text) > len(sent):
            yield text[len(sent):]

    def _request(self, question: str, images, video, history, thinking, system, max_tiles, num_frames,
                 flash, flash_relative_threshold, flash_absolute_threshold, sampling):
        params = SamplingParams(**sampling)
        prompt = self.build_prompt(question, images, video, history, thinking, system, max_tiles, num_frames)
        return prompt, self.flash_settings(flash, flash_relative_threshold, flash_absolute_threshold), params

    def stream_chat(self, question: str, images: list[ImageLike] = (), *, video=None,
                    history: list[tuple[str, str]] = (), thinking: bool = False, system: str | None = None,
                    max_tiles: int | None = None, num_frames: int = 8, flash: bool | None = None,
                    flash_relative_threshold: float | None = None, flash_absolute_threshold: float | None = None,
                    **sampling) -> Iterator[str]:
        """Yield the answer as text pieces while it is generated (arguments as in `chat`)."""
        yield from self._stream(*self._request(
            question, images, video, history, thinking, system, max_tiles, num_frames, flash,
            flash_relative_threshold, flash_absolute_threshold, sampling))

    def chat(self, question: str, images: list[ImageLike] = (), *, video=None,
             history: list[tuple[str, str]] = (), thinking: bool = False, system: str | None = None,
             max_tiles: int | None = None, num_frames: int = 8, flash: bool | None = None,
             flash_relative_threshold: float | None = None, flash_absolute_threshold: float | None = None,
             return_history: bool = False, **sampling) -> str | tuple[str, list[tuple[str, str]]]:
        """Answer `question` about `images` (paths, bytes or PIL) or a `video`.

        `history` holds earlier (question, answer) turns; `thinking=True` uses the reasoning system
        prompt; `flash` and the thresholds override the checkpoint's Flash settings for this call;
        `sampling` takes the `SamplingParams` fields (max_new_tokens, temperature, top_p, ...).
        """
        prompt, fl, params = self._request(question, images, video, history, thinking, system, max_tiles,
                                           num_frames, flash, flash_relative_threshold,
                                           flash_absolute_threshold, sampling)
        answer = "".join(self._stream(prompt, fl, params)).strip()
        if not return_history:
            return answer
        return answer, [*history, (prompt.question, answer)]

    @torch.inference_mode()
    def batch_chat(self, questions: list[str], images: list[list[ImageLike]] | None = None,
                   **sampling) -> list[str]:
        """Answer several prompts in one left-padded batch (no Flash compaction)."""
        params = SamplingParams(**sampling)
        images = images or [[] for _ in questions]
        prompts = [self.build_prompt(q, im) for q, im in zip(questions, images)]
        encoded = [self.encode(p) for p in prompts]
        feats = [f for _, f in encoded if f is not None]
        outs: list[list[int]] = [[] for _ in prompts]
        for step in generate_stream(self.model, [ids for ids, _ in encoded], params, self.stop_ids,
                                    torch.cat(feats) if feats else None, self.tokenizer.pad_id, self.compile):
            for i, tok in enumerate(step):
                if tok is not None and tok not in self.stop_ids:
                    outs[i].append(tok)
        return [self.tokenizer.decode(o).strip() for o in outs]

    def _check_length(self, n: int) -> None:
        if n > self.cfg.text.max_position_embeddings:
            raise InputError(f"prompt + max_new_tokens = {n} tokens exceeds the context of "
                             f"{self.cfg.text.max_position_embeddings}")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are far slower there), bf16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load(path_or_preset: str | Path = "mini", dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", part: str = "all", compile: bool = False,
         pack_weights: bool = False) -> ChatModel:
    """Load a checkpoint directory of either format (auto-detected), or "mini", for inference;
    `part="vision"` / `"language"` loads one side only (decoupled serving); `compile` decodes with
    torch.compile (a one-time compile per batch size and length bucket, then faster steps; where the
    LLM's weights hold only bf16 values, as loaded from bf16 storage, single-sequence steps read a bf16
    copy of them: exact, half the bytes, and half the LLM's fp32 size in memory). A single prompt of a
    dense LLM on CPU decodes through the native kernel either way, from that copy where it exists
    (see `generate_stream`);
    `pack_weights` keeps a oneDNN-packed copy of the LLM weights for decode steps (fp32 CPU; the
    LLM's size in memory again: see `PackedWeight`)."""
    device = check_device(device)  # before reading anything: a bad name fails in one line
    path = resolve_path(path_or_preset)
    cfg, fmt = config_from_dict(read_config_json(path), name=path.name)
    tokenizer = Tokenizer.from_dir(path)
    model = load_weights(path, cfg, fmt, dtype or default_dtype(device), device, part)
    fuse_projections_(model)
    if compile:
        bf16_copies_(model)  # single-sequence steps read them (fp32 CPU weights loaded from bf16 storage)
    if pack_weights and not pack_weights_(model):
        warnings.warn("pack_weights applies to fp32 models on CPU (with oneDNN); loaded without packing")
    return ChatModel(model, tokenizer, fmt, path, compile)
