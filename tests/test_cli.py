"""The command line on a tiny checkpoint: chat (one-shot, streaming, interactive), convert, info."""

import subprocess
import sys

import internvl35


def _cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "internvl35.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_chat_one_shot_matches_api(tiny_ckpt, image, tmp_path):
    image.save(tmp_path / "img.png")
    r = _cli("chat", "--model", str(tiny_ckpt), "--image", str(tmp_path / "img.png"), "--max-new-tokens", "8",
             "--max-tiles", "2", "Describe the image.")
    assert r.returncode == 0, r.stderr
    m = internvl35.load(tiny_ckpt)
    assert r.stdout.strip() == m.chat("Describe the image.", [tmp_path / "img.png"], max_new_tokens=8, max_tiles=2)
    s = _cli("chat", "--model", str(tiny_ckpt), "--image", str(tmp_path / "img.png"), "--max-new-tokens", "8",
             "--max-tiles", "2", "--stream", "Describe the image.")
    assert s.returncode == 0 and s.stdout.strip() == r.stdout.strip()


def test_chat_interactive_keeps_history(tiny_ckpt):
    r = _cli("chat", "--model", str(tiny_ckpt), "--max-new-tokens", "4", stdin="hello\nagain\nexit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant>") == 2


def test_convert_and_info(tiny_ckpt, tmp_path):
    r = _cli("convert", "--to", "hf", str(tiny_ckpt), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    info = _cli("info", str(tmp_path / "hf"))
    assert info.returncode == 0 and "hf (transformers)" in info.stdout and "params" in info.stdout
    bad = _cli("convert", "--to", "onnx", str(tiny_ckpt), str(tmp_path / "x"))
    assert bad.returncode == 1 and "--to must be" in bad.stderr


def test_serve_rejects_an_unknown_preprocess_side_before_loading(tmp_path):
    # a missing checkpoint would fail later, at loading: the option is checked first
    r = _cli("serve", "--model", str(tmp_path / "absent"), "--vision", "tcp://127.0.0.1:1", "--preprocess", "gpu")
    assert r.returncode == 1 and r.stderr.strip() == "error: preprocess takes one of vision, language, not 'gpu'"


def test_a_device_that_is_not_here_is_one_line_before_loading(tmp_path):
    # a missing checkpoint would fail later, at loading: the device is checked first
    absent = str(tmp_path / "absent")
    for cmd in (["chat", "--model", absent, "hi"], ["serve", "--model", absent], ["serve-vision", "--model", absent],
                ["eval", "--model", absent, "--n", "1"]):
        r = _cli(*cmd, "--device", "tpu")
        want = "error: unknown device 'tpu': use cpu, cuda or cuda:N"
        assert r.returncode == 1 and r.stderr.strip() == want, r.stderr
    r = _cli("serve-vision", "--model", absent, "--device", "cuda:99")
    assert r.returncode == 1 and r.stderr.startswith("error: device 'cuda:99': ") and "Traceback" not in r.stderr
