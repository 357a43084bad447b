"""Images named by OpenAI `image_url` parts: data URLs, local files (only under an allowed folder)
and http(s) URLs fetched with a timeout and a size cap. Decoding goes through `load_image`, which
refuses decompression bombs before decoding pixels."""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from internvl35.data.image import EncodedImage, load_image
from internvl35.errors import InputError


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    fetch_timeout_s: float = 10.0
    local_dir: Path | None = None  # file:// URLs are refused unless this is set


def fetch_image(url: str, limits: MediaLimits) -> Image.Image:
    """One image_url -> RGB image; InputError saying what to fix otherwise."""
    return load_image(fetch_bytes(url, limits), limits.max_pixels)


def fetch_encoded(url: str, limits: MediaLimits) -> EncodedImage:
    """One image_url -> the undecoded file with its size (checked against the pixel cap)."""
    return EncodedImage.probe(fetch_bytes(url, limits), limits.max_pixels)


def fetch_bytes(url: str, limits: MediaLimits) -> bytes:
    """One image_url -> the file's bytes (size-capped)."""
    if url.startswith("data:"):
        return _data_url(url, limits)
    if url.startswith(("http://", "https://")):
        return _http(url, limits)
    if url.startswith("file://") or url.startswith("/"):
        return _local(url, limits)
    raise InputError(f"unsupported image_url {url[:40]!r}: use a data: URL, http(s):// or file://")


def _data_url(url: str, limits: MediaLimits) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise InputError("data URL must look like data:image/png;base64,<data>")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise InputError(f"image is larger than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("data URL payload is not valid base64") from None


def _http(url: str, limits: MediaLimits) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "internvl35"})
    try:
        with urllib.request.urlopen(req, timeout=limits.fetch_timeout_s) as resp:  # noqa: S310 (scheme checked)
            data = resp.read(limits.max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise InputError(f"fetching {url} failed: HTTP {e.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise InputError(f"fetching {url} failed: {getattr(e, 'reason', e)}") from None
    if len(data) > limits.max_bytes:
        raise InputError(f"image at {url} is larger than {limits.max_bytes} bytes")
    return data


def _local(url: str, limits: MediaLimits) -> bytes:
    if limits.local_dir is None:
        raise InputError("local image files are disabled; start the server with --media-dir DIR")
    path = Path(unquote(urlparse(url).path) if url.startswith("file://") else url).resolve()
    root = limits.local_dir.resolve()
    if root not in path.parents:
        raise InputError(f"{path} is outside the allowed media folder {root}")
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    if path.stat().st_size > limits.max_bytes:
        raise InputError(f"{path} is larger than {limits.max_bytes} bytes")
    return path.read_bytes()
