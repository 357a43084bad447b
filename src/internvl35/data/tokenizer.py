"""The checkpoint's tokenizer (`tokenizer.json`, read with `tokenizers`) with special-token ids
resolved once, plus training of small BPE tokenizers that carry every InternVL special token."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from internvl35.data.template import ADDED_TOKENS, IMG_CONTEXT, SPECIAL_TOKENS
from internvl35.errors import CheckpointError


class Tokenizer:
    def __init__(self, tok: HFTokenizer) -> None:
        self.tok = tok
        self.img_context_id = self.token_id(IMG_CONTEXT)
        self.im_end_id = self.token_id("<|im_end|>")
        self.pad_id = self.token_id("<|endoftext|>")

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        f = path / "tokenizer.json"
        if not f.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json")
        return cls(HFTokenizer.from_file(str(f)))

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"tokenizer has no {token!r} token")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, out: Path) -> None:
        """tokenizer.json + tokenizer_config.json, enough for `transformers.AutoTokenizer` too."""
        self.tok.save(str(out / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "padding_side": "left", "model_max_length": 40960,
               "extra_special_tokens": {"context_image_token": IMG_CONTEXT}}
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with the ChatML and InternVL special tokens added."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(ADDED_TOKENS)
    return Tokenizer(tok)
