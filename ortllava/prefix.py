"""Reusing a key/value cache for a prompt that begins as the one before it did (a chat's next turn; with
`prefix_cache=True`, the next one-prompt generation).

A `HeldCache` is a finished one-row cache with the token ids it holds (the prompt and the answer but its last
token, which was never fed back) and a key for each image whose tokens it holds: what makes two images the same
(a chat's kept image object; a digest of a generation's pixels). A new prompt keeps the longest prefix of those
ids it shares (`reusable_length`), backed up so that it never keeps part of an image, nor an image whose key
differs; `plan_from_held` cuts the cache back to it and runs only the rest, so only the images in the rest go
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
from .embedding.features import ProjectedImages
from .generation.generate import positions_needed

if TYPE_CHECKING:
    from .api import Pipeline
    from .generation.generate import Decoder, GenerationMetrics
    from .generation.runs import KeepCache, Prefill
    from .preprocess.processor import Processor


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


def plan_from_held(
    pipe: Pipeline, inputs: dict[str, np.ndarray], held: HeldCache | None, image_keys: Sequence[Any], same_image: Callable[[Any, Any], bool],
    encode_from: Callable[[int], ProjectedImages], max_new_tokens: int, metrics: GenerationMetrics, hold: Callable[[HeldCache], None],
) -> tuple[Prefill, KeepCache]:
    """The prefill of a one-row prompt (`inputs`: the processor's, `input_ids [1, T]`) from `held`, a cache taken
    from its keeper (a chat, the pipeline's `PrefixSlot`), and what to do with the cache at the end.

    `image_keys`: one per image of the prompt, compared with `held`'s by `same_image`. `encode_from(i)`: the projected
    features of the prompt's images from the i-th on (only those run through the vision path: `project_images`).
    `hold` gives the keeper a cache: this generation's at the end, or, where the generation fails before its
    answer begins, what `held` still holds (it is never lost to a failed prompt).
    """
    ids = inputs["input_ids"][0]
    try:
        spans = image_spans(pipe.processor, ids, inputs.get("image_sizes"))
        cut = reusable_length(ids, spans, image_keys, held, same_image)
        kept_images = sum(1 for start, _ in spans if start < cut)  # (each ends by the cut: it never falls inside one)
        features = encode_from(kept_images) if kept_images < len(spans) else None
        suffix = inputs["input_ids"][:, cut:]
        inputs_embeds = pipe.embed(suffix, features)
    except BaseException:  # the held cache is untouched yet
        if held is not None:
            hold(held)
        raise
    metrics.prefilled_tokens = int(suffix.shape[1])
    if held is not None and cut == 0:  # nothing kept: its buffers go back to the decoder, the prompt starts afresh
        pipe.sessions.decoder.release(held.cache)
        held = None
    prefill = _prefill_after(pipe.sessions.decoder, held, cut, kept_images, inputs_embeds, positions_needed(len(ids), max_new_tokens), hold)

    def keep(cache: KVCache, answer: list[int]) -> None:
        hold(held_after(cache, ids, answer, spans, image_keys))

    return prefill, keep


def _prefill_after(
    decoder: Decoder, held: HeldCache | None, cut: int, kept_images: int, inputs_embeds: np.ndarray, positions: int,
    hold: Callable[[HeldCache], None],
) -> Prefill:
    """The prefill of a prompt whose first `cut` tokens (and `kept_images` images) `held` keeps: `inputs_embeds
    [1, T - cut, D]` are the rest, `positions` what the whole generation needs. A prefill that fails gives `hold`
    the kept part back."""
    if held is None:
        mask = np.ones(inputs_embeds.shape[:2], np.int64)
        return lambda: decoder.start(inputs_embeds, mask, positions)
    kept = held.cache

    def prefill() -> tuple[np.ndarray, KVCache]:
        decoder.truncate(kept, cut)
        cache = kept
        try:
            cache = decoder.reserve(kept, positions)  # room for the rest and the answer: extend never grows it
            if cache is not kept:
                decoder.release(kept)
            return decoder.extend(inputs_embeds, cache), cache
        except BaseException:
            decoder.truncate(cache, cut)
            hold(HeldCache(cache, held.ids[:cut], held.image_keys[:kept_images]))
            raise

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
