"""Reusing a key/value cache for a prompt that begins as the one before it did (a chat's next turn; with
`prefix_cache=True`, the next one-prompt generation).

A `HeldCache` is a finished one-row cache with the token ids it holds (the prompt and the answer but its last
token, which was never fed back) and a key for each image whose tokens it holds: what makes two images the same
(a chat's kept image object; a digest of a generation's pixels). A new prompt keeps the longest prefix of those
ids it shares (`reusable_length`), backed up so that it never keeps part of an image, nor an image whose key
differs; `prefill_after` cuts the cache back to it and runs only the rest, so only the images in the rest go
through the vision encoder.

The answers are those of prefilling the whole prompt afresh, up to float rounding where the runs begin (tested
token for token), except with an int8 key/value cache: a run attends its own new tokens in float and the earlier
ones through their int8 values, so where runs begin changes which positions are rounded.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .decoders import KVCache

if TYPE_CHECKING:
    from .generate import Decoder
    from .processor import Processor
    from .runs import Prefill


@dataclass
class HeldCache:
    """A one-row cache kept after an answer, and what it holds."""

    cache: KVCache
    ids: np.ndarray  # [n] int64: the token ids whose keys/values it holds, n = cache.lengths[0]
    image_keys: list[Any]  # one per image whose tokens are all held, in order


def image_spans(processor: Processor, ids: np.ndarray, image_sizes: np.ndarray | None) -> list[tuple[int, int]]:
    """[start, end) of each image's run of image tokens in the one-row `ids [T]`, in order."""
    if image_sizes is None or len(image_sizes) == 0:
        return []
    positions = np.flatnonzero(ids == processor.image_token_id)
    spans, offset = [], 0
    for height, width in np.asarray(image_sizes).tolist():
        count = processor.num_image_tokens(height, width)
        spans.append((int(positions[offset]), int(positions[offset + count - 1]) + 1))
        offset += count
    return spans


def reusable_length(
    ids: np.ndarray, spans: Sequence[tuple[int, int]], image_keys: Sequence[Any], held: HeldCache | None,
    same_image: Callable[[Any, Any], bool],
) -> int:
    """How many of the prompt `ids [T]`'s first tokens `held` can keep: their longest common prefix, at least one
    token short of the prompt (its last token's logits are needed), and backed up to an image's first token where
    it would end inside that image or keep an image that is not the same one (`same_image` on their keys)."""
    if held is None:
        return 0
    cut = min(_common_prefix(ids, held.ids), len(ids) - 1)
    for index, (start, end) in enumerate(spans):
        if start >= cut:
            break
        if end > cut or index >= len(held.image_keys) or not same_image(image_keys[index], held.image_keys[index]):
            return start
    return cut


def prefill_after(decoder: Decoder, held: HeldCache | None, cut: int, inputs_embeds: np.ndarray, positions: int) -> Prefill:
    """The prefill of a one-row prompt whose first `cut` tokens `held` keeps: `inputs_embeds [1, T - cut, D]` are the
    rest, `positions` what the whole generation needs. With nothing kept, the held buffers go back to the decoder
    and the prompt starts afresh (in them, where they are large enough)."""
    if held is not None and cut == 0:
        decoder.release(held.cache)
        held = None
    if held is None:
        mask = np.ones(inputs_embeds.shape[:2], np.int64)
        return lambda: decoder.start(inputs_embeds, mask, positions)
    kept = held.cache

    def prefill() -> tuple[np.ndarray, KVCache]:
        decoder.truncate(kept, cut)
        grown = decoder.reserve(kept, positions)  # room for the rest and the answer: extend never grows it
        if grown is not kept:
            decoder.release(kept)
        return decoder.extend(inputs_embeds, grown), grown

    return prefill


def held_after(cache: KVCache, prompt_ids: np.ndarray, answer: Sequence[int], spans: Sequence[tuple[int, int]], image_keys: Sequence[Any]) -> HeldCache:
    """What a one-row cache holds at the end of an answer: the prompt and the answer's tokens up to its length, and
    the keys of the images whose tokens all lie within it."""
    length = int(cache.lengths[0])
    ids = np.concatenate([prompt_ids, np.asarray(answer, np.int64)])[:length]
    return HeldCache(cache, ids, [key for key, (_, end) in zip(image_keys, spans) if end <= length])


def pixel_digest(pixels: np.ndarray, size: Sequence[int]) -> bytes:
    """What makes two preprocessed images the same: a digest of their tiles `[n_tiles, 3, S, S]` and their size
    (~3 ms for five 336 px tiles)."""
    digest = hashlib.sha256(np.ascontiguousarray(pixels).data)
    digest.update(np.asarray(size, np.int64).tobytes())
    return digest.digest()


class PrefixSlot:
    """The one cache a `Pipeline` keeps between one-prompt generations (`prefix_cache=True`). A generation takes it
    (so two that run at once never share it) and puts its own back at the end; the one it replaces goes back to the
    decoder for its buffers."""

    def __init__(self, decoder: Decoder):
        self._decoder = decoder
        self._lock = threading.Lock()
        self._held: HeldCache | None = None

    def take(self) -> HeldCache | None:
        with self._lock:
            held, self._held = self._held, None
        return held

    def put(self, held: HeldCache) -> None:
        with self._lock:
            replaced, self._held = self._held, held
        if replaced is not None:
            self._decoder.release(replaced.cache)

    @property
    def cached_tokens(self) -> int:
        """Tokens the kept cache holds (0: none kept, or taken by a generation that runs now)."""
        held = self._held
        return 0 if held is None else len(held.ids)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
