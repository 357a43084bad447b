"""Image loading and Dynamic High Resolution tiling.

`dynamic_preprocess` picks the tile grid closest to the image's aspect ratio (ties go to the larger
grid only when the image covers more than half of it), resizes, crops row-major and appends a
thumbnail; `tiles_to_tensor` applies the ImageNet normalisation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from internvl35.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 64_000_000  # decompression-bomb guard: refuse larger images before decoding


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """An image still in its file format (PNG, JPEG, ...): its size is read from the header, its pixels
    are not decoded. Decoupled serving sends these bytes to a vision server, which decodes and tiles
    them; the language side needs only the size to know how many tiles (and tokens) the image becomes."""

    data: bytes
    width: int
    height: int

    @classmethod
    def probe(cls, data: bytes, max_pixels: int = MAX_PIXELS) -> EncodedImage:
        try:
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            raise InputError(f"cannot decode image data as an image: {e}") from None
        if w * h > max_pixels:
            raise InputError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
        return cls(data, w, h)


ImageLike = Image.Image | str | Path | bytes | EncodedImage


def load_image(src: ImageLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A path, raw bytes or PIL image -> RGB PIL image; a clear InputError on anything unusable."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, EncodedImage):
        src = src.data
    try:
        if isinstance(src, bytes):
            img = Image.open(io.BytesIO(src))
        else:
            img = Image.open(Path(src))
        w, h = img.size
        if w * h > max_pixels:
            raise InputError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
        img.load()
        return img.convert("RGB")
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"image not found: {src}") from None
    except Exception as e:  # PIL raises many types for bad data; all mean the same to the user
        what = "image data" if isinstance(src, bytes) else str(src)
        raise InputError(f"cannot decode {what} as an image: {e}") from None


def target_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (columns, rows) with min_num <= columns*rows <= max_num, by ascending tile count."""
    grids = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
             for j in range(1, n + 1) if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], image_size: int) -> tuple[int, int]:
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)
    return best


def num_tiles(width: int, height: int, image_size: int, max_num: int = 12, use_thumbnail: bool = True,
              min_num: int = 1) -> int:
    """How many tiles `dynamic_preprocess` makes of a width x height image (without decoding it)."""
    cols, rows = closest_grid(width, height, target_grids(min_num, max_num), image_size)
    return cols * rows + (use_thumbnail and cols * rows != 1)


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = True) -> list[Image.Image]:
    """Split an image into an aspect-preserving grid of square tiles (+ a thumbnail when > 1 tile)."""
    w, h = image.size
    cols, rows = closest_grid(w, h, target_grids(min_num, max_num), image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def _normalisation_table() -> np.ndarray:
    """[3, 256] float32: ((v / 255 - mean) / std) for every byte value v of each channel, by the same
    three float32 operations the reference applies to each pixel, so looking values up gives
    identical tiles."""
    v = torch.arange(256, dtype=torch.float32)[None]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1), torch.tensor(IMAGENET_STD).view(3, 1)
    return v.div(255.0).sub(mean).div(std).numpy()


_TABLE = _normalisation_table()


def tiles_to_tensor(tiles: list[Image.Image], image_size: int) -> torch.Tensor:
    """PIL tiles -> normalised float32 [N, 3, S, S] (contiguous NCHW: a channels-last tensor takes
    another conv kernel, so the same tiles would give slightly different features after a trip
    through a wire format or a copy)."""
    arrays = []
    for t in tiles:
        if t.size != (image_size, image_size):
            t = t.resize((image_size, image_size), Image.BICUBIC)
        arrays.append(np.asarray(t.convert("RGB")))
    x = np.stack(arrays)  # [N, S, S, 3] bytes
    out = np.empty((x.shape[0], 3, *x.shape[1:3]), np.float32)
    # one table lookup per value, written straight into its channel plane: a third of the time of
    # converting and normalising the bytes in four passes (7 mini tiles: 0.33-0.36 vs 0.72-0.88 ms;
    # 13 tiles of 448 px: 12 vs 35 ms), with the same values
    for c in range(3):
        np.take(_TABLE[c], x[..., c], out=out[:, c])
    return torch.from_numpy(out)


def preprocess_image(src: ImageLike, image_size: int, max_num: int = 12, use_thumbnail: bool = True,
                     dynamic: bool = True) -> torch.Tensor:
    """One image -> its normalised tiles [N, 3, S, S]."""
    img = load_image(src)
    tiles = dynamic_preprocess(img, 1, max_num if dynamic else 1, image_size, use_thumbnail)
    return tiles_to_tensor(tiles, image_size)
