from internvl35.engine.detokenizer import IncrementalDecoder


def test_incremental_text_equals_full_decode(tokenizer):
    text = "naïve café: 3 × 4 = 12 ✓ 数字 🙂 done"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert any(tokenizer.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # split characters
    dec = IncrementalDecoder(tokenizer)
    for i, t in enumerate(ids, 1):
        got = dec.add(t)
        full = tokenizer.decode(ids[:i])
        # equal to the full decode except for a held-back incomplete character
        assert full.startswith(got) and len(full.rstrip("\ufffd")) - len(got) <= 1, (i, got, full)
        if not full.endswith("\ufffd"):
            assert got == full
    assert dec.flush() == text


def test_flush_shows_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 🙂")
    dec = IncrementalDecoder(tokenizer)
    for t in ids[:-1]:
        dec.add(t)
    assert dec.flush() == tokenizer.decode(ids[:-1])
