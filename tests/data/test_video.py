import numpy as np
import pytest
from PIL import Image

import internvl35
from internvl35.data.video import frame_indices, load_frames
from internvl35.errors import InputError


def _frames(n=10):
    return [Image.new("RGB", (64, 48), (i * 20, 0, 0)) for i in range(n)]


def test_frame_indices_are_segment_midpoints():
    # seg = 31/8; frame k = int(seg/2 + round(seg*k)) (Python rounding, as in the model card)
    assert frame_indices(32, 8) == [1, 5, 9, 13, 17, 20, 24, 28]
    assert frame_indices(9, 8) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_gif_folder_and_file(tmp_path):
    frames = _frames()
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    assert len(load_frames(tmp_path / "a.gif", 4)) == 4
    (tmp_path / "dir").mkdir()
    for i, f in enumerate(frames):
        f.save(tmp_path / "dir" / f"{i:03d}.png")
    got = load_frames(tmp_path / "dir", 5)
    assert [f.getpixel((0, 0))[0] for f in got] == [20 * i for i in frame_indices(10, 5)] == [0, 40, 80, 100, 140]
    av = pytest.importorskip("av")
    with av.open(str(tmp_path / "v.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    assert len(load_frames(tmp_path / "v.mp4", 4)) == 4
    with pytest.raises(InputError):
        load_frames(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"nope")
    with pytest.raises(InputError, match="cannot decode video"):
        load_frames(tmp_path / "bad.mp4")


def test_video_prompt_one_tile_per_frame(tiny_ckpt):
    m = internvl35.load(tiny_ckpt)
    p = m.build_prompt("Which way does it move?", video=_frames(), num_frames=4)
    assert p.tiles_per_image == [1, 1, 1, 1]
    assert "Frame1: <img>" in p.text and "Frame4: <img>" in p.text
    assert isinstance(m.chat("Which way?", video=_frames(), num_frames=4, max_new_tokens=4), str)
