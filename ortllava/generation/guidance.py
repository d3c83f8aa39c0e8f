"""Classifier-free guidance (`guidance_scale`, `negative_prompt_ids`), as transformers gives it to a decoder-only model
(its `UnbatchedClassifierFreeGuidanceLogitsProcessor`). Each step's scores `[B, V]` become

    g · (log_softmax(scores) − u) + u,    u = log_softmax(unconditional logits)

where the unconditional logits come from a second pass of the same decoder over a cache of its own: it reads each
row's negative prompt (text only: no image is encoded for it), or, where none is given, the row's last prompt token,
and then the token the row picked at each step. g > 1 pushes an answer away from what the negative prompt makes
likely; g = 0 gives the negative prompt's own scores; g = 1 is off.

As in transformers:
- the guidance processor is the first processor, and its pass starts at the first new token, after the prompt's prefill;
- under beam search its cache is never reordered: each row reads its hypothesis' newest token over the cache that
  row began with;
- a row that has ended is fed the pad id (the decode loop writes it into the picked tokens, which this pass reads).

A negative prompt's positions count from 0. transformers' guidance pass gives the model no position ids, so a padded
negative prompt's tokens would sit at other positions than the same prompt alone: negative prompts are taken
without padding, one list of ids per prompt, of any lengths, each run as that prompt alone (what transformers gives
for one prompt per call).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..decoders import KVCache
from .generate import Decoder, non_finite_hint, positions_needed
from .logits_processors import log_softmax


@dataclass
class GuidanceModel:
    """What the unconditional pass runs: the bundle's decoder and its token embeddings `[V, D]`."""

    decoder: Decoder
    embed_table: np.ndarray


def negative_rows(
    negative_prompts: tuple[tuple[int, ...], ...] | None, prompt_ids: np.ndarray, copies: int, vocab_size: int,
) -> list[tuple[int, ...]]:
    """Each cache row's unconditional prompt: `negative_prompts` (one for every prompt, or one per prompt, repeated for
    its `copies` rows), else each row's last prompt token (`prompt_ids [rows, T]`, left-padded: the last is real).
    A ValueError names an id past the vocabulary, or a count of negative prompts that fits neither."""
    rows = prompt_ids.shape[0]
    if negative_prompts is None:
        return [(int(token),) for token in prompt_ids[:, -1]]
    prompts = rows // copies
    if len(negative_prompts) not in (1, prompts):
        raise ValueError(
            f"negative_prompt_ids holds {len(negative_prompts)} negative prompts for {prompts} prompts: give one for every "
            "prompt, or one per prompt"
        )
    outside = [token for ids in negative_prompts for token in ids if token >= vocab_size]
    if outside:
        raise ValueError(f"negative_prompt_ids: token id {outside[0]} is not in the model's vocabulary of {vocab_size}")
    if len(negative_prompts) == 1:
        return list(negative_prompts) * rows
    return [ids for ids in negative_prompts for _ in range(copies)]


class ClassifierFreeGuidance:
    """The logits processor (see the module's docstring). `rows`: each cache row's unconditional prompt
    (`negative_rows`); the pass holds `positions_needed(longest, max_new_tokens)` positions, which `check` tests
    against the decoder up front."""

    def __init__(self, scale: float, model: GuidanceModel, rows: list[tuple[int, ...]], max_new_tokens: int):
        self.scale = np.float32(scale)  # (torch multiplies float32 scores by a Python float in float32)
        self.decoder, self.table = model.decoder, model.embed_table
        self.rows = rows
        self.positions = positions_needed(max(map(len, rows)), max_new_tokens)
        self.cache: KVCache | None = None
        self.last: np.ndarray | None = None  # [B]: the tokens picked at the previous step (pad where a row has ended)
        self.steps = 0

    def check(self) -> None:
        """A ContextLengthError where the unconditional pass needs more positions than the decoder serves."""
        self.decoder.check_length(self.positions)

    def _unconditional_logits(self) -> np.ndarray:
        """`[B, V]` float32: the negative prompts' last logits at the first step, the picked tokens' after it."""
        if self.cache is None:
            longest = max(map(len, self.rows))
            embeds = np.zeros((len(self.rows), longest, self.table.shape[1]), self.table.dtype)
            mask = np.zeros((len(self.rows), longest), np.int64)
            for row, ids in enumerate(self.rows):  # (left-padded, as the prompts: both decoder kinds take it)
                embeds[row, longest - len(ids) :] = self.table[list(ids)]
                mask[row, longest - len(ids) :] = 1
            logits, self.cache = self.decoder.start(embeds, mask, self.positions)
            return logits
        out = self.cache.step_embeds
        if self.table.dtype == out.dtype:  # ("clip": the ids are the sampler's or the pad id, all checked in range)
            self.table.take(self.last, axis=0, out=out[:, 0], mode="clip")
        else:
            out[:, 0] = np.take(self.table, self.last, axis=0)
        return self.decoder.step(self.cache)

    def __call__(self, scores: np.ndarray) -> None:
        logits = self._unconditional_logits()
        self.steps += 1
        if not np.isfinite(np.einsum("bv->", logits)):
            raise FloatingPointError(
                f"the decoder returned non-finite logits for the negative prompt at new token {self.steps}: {non_finite_hint(self.decoder)}"
            )
        unconditional = log_softmax(logits)
        scores[...] = log_softmax(scores)
        scores -= unconditional  # (transformers' order: scale * (scores - unconditional) + unconditional, in float32)
        scores *= self.scale
        scores += unconditional

    def picked(self, tokens: np.ndarray) -> None:
        # (the array itself: the decode loop writes the pad id into it for rows that have ended, as transformers feeds them)
        self.last = tokens

    def reorder(self, rows: np.ndarray) -> None:
        pass  # (transformers' guidance cache keeps its rows: see the module's docstring)

    def close(self) -> None:
        """Lets the unconditional cache go (`discard`: not as the decoder's spare, which is the answer's own, larger cache)."""
        cache, self.cache = self.cache, None
        if cache is not None:
            self.decoder.discard(cache)
