"""Wire format between the language server and vision servers (ZeroMQ multipart messages).

Frame 0 is a small msgpack header; every further frame is the raw bytes of one tensor, described in
the header (`tensors`: dtype and shape per frame). No pickle: a peer can only send plain data, and
`unpack` checks every field, dtype and size before building a tensor. Sending is zero-copy (frames
are views of the tensors); receiving copies each frame once into an aligned tensor.

Messages (`type`):
  encode    language -> vision: `id`, `tiles_per_image`, `flash` ([relative, absolute] or None);
            one frame: the request's tiles [N, 3, S, S] (float32, as preprocessed)
  encode_files  language -> vision: `id`, `tiles_per_image` (as the language side counted them),
            `max_tiles`, `flash`; one uint8 frame per image: its file bytes (PNG, JPEG, ...), which
            the vision server decodes and tiles itself
  features  vision -> language: `id`, `tokens_per_tile`; one frame: features [M, D] in bfloat16
  error     either way: `id` (may be None), `message`; `input: true` when the request's own data is
            bad (an undecodable image): the language server reports it to its client, no retry
  ping/pong health check: `id`
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import torch

VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_BYTES = 1 << 31
_REQUIRED = {"encode": ("id", "tiles_per_image"), "encode_files": ("id", "tiles_per_image", "max_tiles"),
             "features": ("id", "tokens_per_tile"), "error": ("message",), "ping": ("id",), "pong": ("id",)}


class ProtocolError(ValueError):
    """A message that does not follow the wire format (the text says what is wrong)."""


def pack(header: dict[str, Any], tensors: list[torch.Tensor] = ()) -> list[bytes | memoryview]:
    """-> frames for `socket.send_multipart(frames, copy=False)` (tensor frames are not copied)."""
    specs, frames = [], []
    for t in tensors:
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ProtocolError(f"cannot send dtype {t.dtype}")
        t = t.detach().cpu().contiguous()
        specs.append({"dtype": name, "shape": list(t.shape)})
        frames.append(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return [msgpack.packb({**header, "v": VERSION, "tensors": specs}), *frames]


def unpack(frames: list) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Frames (bytes or zmq.Frame) -> (header, tensors); ProtocolError on anything malformed."""
    if not frames:
        raise ProtocolError("empty message")
    raw = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    if len(raw[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw[0])} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(bytes(raw[0]), raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for bad bytes
        raise ProtocolError(f"header is not msgpack: {e}") from None
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise ProtocolError(f"header must be a map with v={VERSION}")
    kind = header.get("type")
    if kind not in _REQUIRED:
        raise ProtocolError(f"unknown message type {kind!r}")
    missing = [k for k in _REQUIRED[kind] if k not in header]
    if missing:
        raise ProtocolError(f"{kind} message lacks {missing}")
    if not isinstance(header.get("id"), (str, type(None))):
        raise ProtocolError("id must be a string")
    specs = header.get("tensors")
    if not isinstance(specs, list) or len(specs) != len(raw) - 1:
        raise ProtocolError(f"header describes {len(specs) if isinstance(specs, list) else '?'} tensor(s), "
                            f"message has {len(raw) - 1} data frame(s)")
    return header, [_tensor(s, buf) for s, buf in zip(specs, raw[1:])]


def _tensor(spec: Any, buf) -> torch.Tensor:
    if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES:
        raise ProtocolError(f"bad tensor spec {spec!r}: dtype must be one of {sorted(DTYPES)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    dtype = DTYPES[spec["dtype"]]
    numel = 1
    for d in shape:
        numel *= d
    size = numel * dtype.itemsize
    if size > MAX_TENSOR_BYTES or size != len(buf):
        raise ProtocolError(f"tensor {spec['dtype']}{shape} needs {size} bytes, frame has {len(buf)}")
    out = torch.empty(shape, dtype=dtype)
    if numel:
        # One copy into torch-allocated memory: a view over the frame would be read-only and may be
        # misaligned, and misaligned inputs take other (numerically different) conv/matmul kernels.
        out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(buf, dtype=np.uint8)
    return out
