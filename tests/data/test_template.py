import pytest

from internvl35.data.template import attach_images, expand_image_tokens, get_template, image_prefix


def test_internvl2_5_rendering():
    t = get_template("internvl2_5")
    text = t.render("Q2", [("Q1", "A1")], system="SYS")
    assert text == ("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")


def test_placeholders_and_expansion():
    assert image_prefix(1) == "<image>\n"
    assert image_prefix(2) == "Image-1: <image>\nImage-2: <image>\n"
    assert image_prefix(2, video=True) == "Frame1: <image>\nFrame2: <image>\n"
    out = expand_image_tokens("a <image> b <image>", [2, 1], 4)
    assert out == "a <img>" + "<IMG_CONTEXT>" * 8 + "</img> b <img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    with pytest.raises(ValueError):
        expand_image_tokens("<image>", [1, 1], 4)


def test_attach_images():
    assert attach_images("Q", [], 1) == "<image>\nQ"
    assert attach_images("Q", [("<image>\nQ0", "A")], 1) == "Q"
    with pytest.raises(ValueError, match="placeholder"):
        attach_images("<image> <image> Q", [], 1)
