"""The decode loop: prefill the prompt, then one token at a time.

`generate_step` is a generator of next tokens and their logits (mlx-lm style); `decode_loop` runs the prefill and
then `generate_step` with the EOS rule and timings, yielding each step to `runs.collect` (results) and
`runs.stream_chunks` (text pieces), for `Pipeline.generate`, `Pipeline.stream` and chat sessions (which keep the cache
for the next turn). The decoder (the `decoders` package) runs the graph over a `KVCache`, which holds the keys/values and each
row's length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..decoders import ConcatDecoder, FusedDecoder, KVCache
from .sampling import Sampler

Decoder = FusedDecoder | ConcatDecoder
EmbedFn = Callable[[np.ndarray, np.ndarray], None]  # (token ids [B], out [B, 1, D]): writes their embeddings


def positions_needed(prompt_tokens: int, max_new_tokens: int) -> int:
    """Cache positions a generation fills: the prompt and every new token but the last, which is never fed back
    (as transformers, whose answers may end exactly at the model's last position)."""
    return prompt_tokens + max_new_tokens - 1


@dataclass
class GenerationMetrics:
    """The timings and sizes of one generation: a batch's results share it (each result's own token counts are its
    `prompt_tokens` and `len(token_ids)`)."""

    prompt_tokens: int = 0  # longest prompt of the batch, image tokens included
    prefilled_tokens: int = 0  # prompt tokens run through the decoder: all of them, or a chat turn's new ones
    generated_tokens: int = 0  # new tokens of the longest answer
    preprocess_s: float = 0.0  # images and text -> arrays
    vision_s: float = 0.0  # vision encoder + projector + packing
    prefill_s: float = 0.0  # decoder over the prompt
    time_to_first_token_s: float = 0.0  # from the call to the first new token
    decode_s: float = 0.0  # every step after the first token
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def decode_ms_per_token(self) -> float:
        rate = self.decode_tokens_per_s
        return 1000.0 / rate if rate else 0.0

    def as_dict(self) -> dict[str, float]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        out["decode_ms_per_token"] = self.decode_ms_per_token
        return out


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the new tokens, the stop token included when one ended the answer
    finish_reason: str  # "stop" (an EOS token or a stop string) or "length" (max_new_tokens, max_length or max_time)
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)
    # [len(token_ids), V] float32 with output_logits=True: the raw logits each was picked from (left out of == and repr)
    logits: np.ndarray | None = field(default=None, compare=False, repr=False)
    # This answer's prompt: its tokens, images included, without the batch's padding (with len(token_ids), an
    # OpenAI-style usage count; a chat turn's prompt is the whole conversation)
    prompt_tokens: int = 0


def generate_step(
    decoder: Decoder,
    logits: np.ndarray,
    cache: KVCache,
    embed: EmbedFn,
    sampler: Sampler,
    max_new_tokens: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields the next tokens `[B]` of every row and the logits `[B, V]` they were picked from (the decoder's
    buffer: read it before the next step), `max_new_tokens` times at most.

    `logits [B, V]` and `cache` come from the prompt's prefill. The caller may overwrite a yielded tokens array
    in place before the next step (to feed pad ids to rows that have finished); the next step embeds what the
    array then holds, straight into the cache's step buffer.
    """
    for step in range(max_new_tokens):
        # Non-finite iff some logit is (or they overflow a float32 sum): one scalar, no per-step allocation. (einsum's
        # plain loop: half the time of numpy's pairwise sum, ~15 us for 32k logits on this CPU, a decode step's most.)
        if not np.isfinite(np.einsum("bv->", logits)):
            raise FloatingPointError(f"the decoder returned non-finite logits at new token {step + 1}: {non_finite_hint(decoder)}")
        tokens = sampler(logits)
        yield tokens, logits
        if step + 1 == max_new_tokens:
            return
        embed(tokens, cache.step_embeds)
        logits = decoder.step(cache)


def non_finite_hint(decoder: Decoder) -> str:
    """Why a decoder's logits may not be finite, and what to do, by its precision."""
    if np.dtype(decoder.dtype) == np.float16:
        return "in fp16, an activation overflowed; no answer is given rather than a wrong one: use an fp32 bundle for this input"
    return (
        "an fp32 decoder gives such logits only from non-finite weights or embeddings; no answer is given rather than a "
        "wrong one: load the bundle with its sha256 checks on (verify=True, no --no-verify) to find a damaged file"
    )


@dataclass
class Step:
    """One step of `decode_loop`: every row's token (pad for rows finished before), which rows are done, and the
    logits the tokens were picked from."""

    tokens: np.ndarray  # [B] int64
    active: np.ndarray  # [B] bool: the row produced `tokens[row]` in this step
    # [B] bool: the row hit an EOS token (or a stopping criterion) at or before this step. The consumer may mark more
    # rows (in place, before the next step: stop strings): they are fed the pad id from then on, as transformers does.
    finished: np.ndarray
    logits: np.ndarray  # [B, V] float32: the decoder's buffer, overwritten by the next step


def decode_loop(
    decoder: Decoder,
    prefill: Callable[[], tuple[np.ndarray, KVCache]],
    embed: EmbedFn,
    sampler: Sampler,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    metrics: GenerationMetrics,
    started: float,
    keep_cache: Callable[[KVCache], None] | None = None,
    stop_rows: Callable[[np.ndarray], np.ndarray | None] | None = None,
) -> Iterator[Step]:
    """Runs `prefill` (the decoder's `start` or `extend` over the prompt), then `generate_step` until every
    row has hit an EOS token or `max_new_tokens`; yields each step.

    Rows that finished early are fed `pad_token_id`, as transformers does. `stop_rows(logits)`, called after each
    step's pad ids are in place, gives the rows the caller's stopping criteria end there (`[B]` bool, or None); the
    consumer may end more in `Step.finished`. The consumer may stop early (close the generator); `metrics` hold the prefill, first-token and decode timings. At the
    end the cache goes to `keep_cache` (a chat that continues) or back to the decoder for reuse.
    """
    prefill_start = time.perf_counter()
    logits, cache = prefill()
    batch = cache.batch
    is_eos = np.zeros(max([logits.shape[-1], *(i + 1 for i in eos_token_ids)]), dtype=bool)  # [V]: looked up by token id
    is_eos[eos_token_ids] = True
    finished = np.zeros(batch, dtype=bool)
    steps = generate_step(decoder, logits, cache, embed, sampler, max_new_tokens)
    decode_start = prefill_start
    try:
        for index, (tokens, step_logits) in enumerate(steps):
            if index == 0:
                decode_start = time.perf_counter()
                metrics.prefill_s = decode_start - prefill_start
                metrics.time_to_first_token_s = decode_start - started
            active = ~finished
            tokens[finished] = pad_token_id  # in place: the generator embeds this array for the next step
            finished = finished | is_eos[tokens]  # (np.isin: ~13 us a step; comparing with each EOS id: ~5; this ~1)
            if stop_rows is not None:
                ended = stop_rows(step_logits)
                if ended is not None:
                    finished |= ended
            metrics.generated_tokens = index + 1
            yield Step(tokens, active, finished, step_logits)
            if finished.all():
                break
    finally:
        steps.close()
        metrics.decode_s = time.perf_counter() - decode_start
        if keep_cache is not None:
            keep_cache(cache)
        else:
            decoder.release(cache)
