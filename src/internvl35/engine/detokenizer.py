"""Incremental detokenization: the text of a growing completion in O(new tokens) per step.

A token's text can depend on its neighbours (byte-level pieces of one UTF-8 character, decoders that
drop a leading space at the start of a string), so each step decodes a short window that starts a few
tokens back and keeps only what the newest tokens added.
"""

from __future__ import annotations

from typing import Protocol


class _Decodes(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDecoder:
    def __init__(self, tokenizer: _Decodes):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # text of every token up to `read`
        self.prefix = 0  # window start: context for the tokens after `read`
        self.read = 0  # tokens whose text is final

    def add(self, token: int) -> str:
        """Append a token; -> the text so far, without a trailing incomplete character."""
        self.ids.append(token)
        prev = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            self.text += new[len(prev):]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def flush(self) -> str:
        """The whole text, pending bytes included (shown as U+FFFD when they never completed)."""
        if self.read < len(self.ids):
            prev = self.tokenizer.decode(self.ids[self.prefix:self.read])
            self.text += self.tokenizer.decode(self.ids[self.prefix:])[len(prev):]
            self.prefix = self.read = len(self.ids)
        return self.text
