"""Streaming detokenization: token ids arriving one by one -> text pieces whose concatenation is the full decode.

A piece is released only when it is stable: never while the text ends in an incomplete UTF-8 sequence
(U+FFFD), and decoded over a window that starts one released piece back, so that decoders which treat
the first token specially (SentencePiece's leading space) see the same context as a full decode.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.tokens: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens up to here have been released
        self._released_window = ""  # decode of tokens[_prefix:_read]: changes only when text is released
        self.text = ""  # everything released so far

    def add(self, token: int) -> str:
        """Adds one token; returns the newly stable text (often "", never a broken character)."""
        self.tokens.append(token)
        before = self._released_window
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self._released_window = self._decode(self.tokens[self._prefix : self._read])  # once per release, not per token
        self.text += piece
        return piece

    def finalize(self) -> str:
        """The rest of the text once no more tokens will come."""
        full = self._decode(self.tokens)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += piece
        return piece
