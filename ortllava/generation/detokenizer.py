"""Streaming detokenization: token ids arriving one by one -> text pieces whose concatenation is the full decode.

A piece is released only when it is stable: never while the text ends in an incomplete UTF-8 sequence
(U+FFFD), never right after a byte-fallback token or a special one (`holds`), and decoded over a window that
starts one released piece back, so that decoders which treat the first token specially (SentencePiece's leading
space) see the same context as a full decode.

Byte-fallback tokens (`<0x0A>`, in SentencePiece vocabularies such as Mistral's, Vicuna's and Yi's) are decoded as
a group: a run of them that is not valid UTF-8 as a whole becomes one U+FFFD per byte, also its bytes that formed a
character before the next one came (`<0x0A>` is "\n", `<0x0A><0xBB>` is two U+FFFD). So text that ends in such a
token may still change, and is held until a token of another kind follows (or the answer ends). A special token
between two byte tokens is dropped from the answer's text (`skip_special_tokens`), so their bytes join one group:
text is held after special tokens too.
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    """`decode`: ids -> text, as the full answer is decoded; `holds`: ids after which no text is released yet (a
    byte-fallback tokenizer's byte and special tokens: `held_token_ids`)."""

    def __init__(self, decode: Callable[[Sequence[int]], str], holds: Collection[int] = ()):
        self._decode = decode
        self._holds = holds
        self.tokens: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens up to here have been released
        self._released_window = ""  # decode of tokens[_prefix:_read]: changes only when text is released
        self._tail: str | None = ""  # the text after `text`, up to its last complete character (None: not decoded yet)
        self.text = ""  # everything released so far

    def add(self, token: int) -> str:
        """Adds one token; returns the newly stable text (often "", never a broken character)."""
        self.tokens.append(token)
        if token in self._holds:  # the next token may turn this one's byte group into replacement characters
            self._tail = None  # (decoded only if asked for: `tail`)
            return ""
        before = self._released_window
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT) or not after.startswith(before):
            self._tail = after[len(before) :].rstrip(REPLACEMENT) if after.startswith(before) else ""
            return ""
        self._tail = ""
        piece = after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self._released_window = self._decode(self.tokens[self._prefix : self._read])  # once per release, not per token
        self.text += piece
        return piece

    def tail(self) -> str:
        """The text of the tokens not released yet, as it reads now, up to its last complete character: it follows
        `text`, and may still change (the next token may complete a character, or turn a byte group into U+FFFD)
        where `text` does not. A stop string is looked for in `text` + `tail()`, so that one ending inside a token
        that also begins the next character, or in a byte token, is seen at that token, as transformers' stop strings
        see it; that token then ends the answer, whose text is then what was seen."""
        if self._tail is None:  # (after a held token)
            before = self._released_window
            after = self._decode(self.tokens[self._prefix :])
            self._tail = after[len(before) :].rstrip(REPLACEMENT) if after.startswith(before) else ""
        return self._tail

    def finalize(self) -> str:
        """The rest of the text once no more tokens will come."""
        full = self._decode(self.tokens)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += piece
        self._tail = ""
        return piece


def held_token_ids(tokenizer) -> frozenset[int]:
    """The ids after which streamed text waits, for a `tokenizers.Tokenizer`: where its decoder groups byte-fallback
    tokens (`ByteFallback`), those 256 `<0x..>` tokens and its special tokens (which `skip_special_tokens` drops, so
    byte tokens on either side of one join a group); none otherwise (byte-level BPE, as Llama-3's and Qwen's, shows
    an incomplete character as U+FFFD at the end instead, which the detokenizer holds back anyway)."""
    decoder = tokenizer.decoder
    groups_bytes = decoder is not None and b'"ByteFallback"' in decoder.__getstate__()
    if not (groups_bytes or getattr(tokenizer.model, "byte_fallback", False)):
        return frozenset()
    ids = (tokenizer.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    specials = (index for index, token in tokenizer.get_added_tokens_decoder().items() if token.special)
    return frozenset(i for i in (*ids, *specials) if i is not None)
