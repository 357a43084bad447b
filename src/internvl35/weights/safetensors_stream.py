"""Reads safetensors files tensor by tensor with positioned reads instead of mmap, so loading holds
one tensor of the checkpoint in memory at a time (an mmap would keep every touched page resident
until the file closes). Headers are validated up front: a truncated file fails before any copy."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from internvl35.errors import CheckpointError

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int


class SafetensorsReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise CheckpointError(f"{path.name}: truncated file (header says {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path.name}: corrupt safetensors header") from None
        header.pop("__metadata__", None)
        base = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for key, e in header.items():
            if e["dtype"] not in DTYPES:
                raise CheckpointError(f"{path.name}: {key} has unsupported dtype {e['dtype']}")
            start, end = (base + o for o in e["data_offsets"])
            if end > size:
                raise CheckpointError(f"{path.name}: truncated file: {key} ends at byte {end}, file has {size}")
            self.entries[key] = TensorEntry(DTYPES[e["dtype"]], tuple(e["shape"]), start, end)

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        buf = bytearray(e.end - e.start)
        if buf:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [buf], e.start)
            finally:
                os.close(fd)
            if got != len(buf):
                raise CheckpointError(f"{self.path.name}: short read for {key}")
            return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)
        return torch.empty(e.shape, dtype=e.dtype)
