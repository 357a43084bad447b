"""Video as sampled frames: a list of images, an animated GIF, a folder of frames or a video file
(PyAV). Frames are picked at segment midpoints (the model card's rule) and become one tile each."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageSequence

from internvl35.data.image import load_image
from internvl35.errors import InputError

FRAME_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def frame_indices(total: int, num_segments: int) -> list[int]:
    """Midpoints of `num_segments` equal segments over frames 0..total-1."""
    if total <= 0:
        raise InputError("video has no frames")
    seg = (total - 1) / num_segments
    return [min(int(seg / 2 + round(seg * k)), total - 1) for k in range(num_segments)]


def _decode_file(path: Path) -> list[Image.Image]:
    try:
        import av
    except ImportError:
        raise InputError("reading video files needs PyAV: pip install 'internvl35[video]'") from None
    try:
        with av.open(str(path)) as container:
            return [f.to_image() for f in container.decode(video=0)]
    except Exception as e:  # PyAV raises its own error family for bad files
        raise InputError(f"cannot decode video {path}: {e}") from None


def load_frames(src: str | Path | list, num_segments: int = 8) -> list[Image.Image]:
    """Sample `num_segments` RGB frames from a list of images, a GIF, a frame folder or a video file."""
    if isinstance(src, list):
        frames = [load_image(f) for f in src]
    else:
        path = Path(src)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            frames = [load_image(p) for p in files]
        elif not path.exists():
            raise InputError(f"video not found: {path}")
        elif path.suffix.lower() == ".gif":
            with Image.open(path) as gif:
                frames = [f.convert("RGB") for f in ImageSequence.Iterator(gif)]
        else:
            frames = _decode_file(path)
    idx = frame_indices(len(frames), min(num_segments, len(frames)))
    return [frames[i] for i in idx]
