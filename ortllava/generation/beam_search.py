"""Beam search (`num_beams > 1`): transformers' `_beam_search`, step for step, over ortllava's decoder; greedy, or
beam sampling with `do_sample`.

Terms, as transformers uses them. Each prompt keeps `num_beams` *running* hypotheses (rows `b * num_beams + i` of
the cache) and up to `num_beams` *finished* ones. A step scores every continuation of every running hypothesis by
its accumulated log-probability (the processors apply to the log-softmax, as in transformers), keeps the best
`keep = max(2, 1 + n_eos) * num_beams` *candidates* of the prompt (beam sampling: the warpers, each keeping at least
`1 + n_eos` tokens a row (2 where no EOS is set), apply after the processors, and the candidates are drawn without
replacement from the softmax of the prompt's accumulated scores, then ordered best first), and then:
- the best `num_beams` candidates that do not end there (an EOS token, the last new token, or the caller's stopping
  criteria, called on every candidate's ids as transformers calls them) run on: the cache's
  rows and the processors' histories are reordered to the hypotheses they continue (`reorder_rows`, `reorder`);
- the candidates among the best `num_beams` that end there compete with the finished ones, each scored
  `log-probability / new_tokens ** length_penalty`; the best `num_beams` stay finished.
The search ends when no prompt can improve (`early_stopping`: True, all its finished slots full; False,
transformers' heuristic on the best running score at the current length; "never", at the longest length where
`length_penalty > 0`), or at `max_new_tokens`. Each prompt's answers are its best `num_return_sequences` finished
hypotheses, best first.

Scores are float32 as transformers computes them, -1e9 standing for "ruled out". Two things can part the answers from
transformers' on some inputs: ties (rare on real logits), which may break otherwise than torch's topk, and the
log-softmax's rounding (its sum of exponentials is float64 here), within an ulp or two of torch's. Where fewer than
`num_return_sequences` hypotheses ever finish with a score (every continuation forbidden), the missing answers are
empty, where transformers' rows hold fill ids. Beam sampling draws from ortllava's seeded generator (one uniform number
per candidate), not torch's; where a prompt has fewer continuations with any probability than candidates to draw
(a small `top_k` at the first step, when one hypothesis runs), the rest are its most probable others, ruled out in
effect, where torch.multinomial raises an error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..decoders import KVCache
from .generate import Decoder, EmbedFn, GenerationMetrics, non_finite_hint
from .logits_processors import LogitsProcessor, log_softmax
from .sampling import draw_without_replacement, warped_scores
from .settings import GenerationSettings

RULED_OUT = np.float32(-1.0e9)


@dataclass
class BeamAnswers:
    """Each prompt's best finished hypotheses, best first."""

    tokens: list[list[list[int]]]  # [prompt][answer]: the new token ids (an EOS that ended one included)
    scores: list[list[float]]  # [prompt][answer]: log-probability / length ** length_penalty
    stopped: list[list[bool]]  # [prompt][answer]: the caller's stopping criteria ended it


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """`[B, N]` -> `[B, k]` indices of each row's k largest, largest first (ties among them: the lower index first).
    One partition of the row, then a sort of the k only (a row is num_beams x the vocabulary)."""
    if k < scores.shape[1]:
        picked = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        picked.sort(axis=1)
    else:
        picked = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, picked, axis=1), axis=1, kind="stable")
    return np.take_along_axis(picked, order, axis=1)


def _drawn(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """`[B, N]` -> `[B, k]` indices drawn without replacement from each row's softmax (float32, as torch computes it),
    then ordered by score, largest first. A row with fewer than k nonzero probabilities gives them all, then its
    best others."""
    picked = np.empty((len(scores), k), dtype=np.int64)
    for row, out in zip(scores, picked):
        top = row.max()
        probs = np.exp(row - top) if np.isfinite(top) else np.zeros_like(row)  # (every continuation forbidden: none live)
        live = np.flatnonzero(probs)  # (leaving the zeros out changes no draw: `draw_without_replacement`)
        drawn = live[draw_without_replacement(probs[live], min(k, len(live)), rng)]
        if len(drawn) < k:
            rest = row.copy()
            rest[drawn] = np.inf  # (first in `_top`'s order, so the others follow them)
            drawn = _top(rest[None], k)[0]
        out[:] = drawn[np.argsort(-row[drawn], kind="stable")]
    return picked


def beam_search(
    decoder: Decoder, prefill: Callable[[], tuple[np.ndarray, KVCache]], embed: EmbedFn, processors: list[LogitsProcessor], prompts: int,
    settings: GenerationSettings, eos_token_ids: list[int], fill_id: int, metrics: GenerationMetrics, started: float,
    deadline: float = math.inf, stop_candidates: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> BeamAnswers:
    """Runs the search that `settings` ask for (num_beams, max_new_tokens, length_penalty, early_stopping,
    num_return_sequences). `prefill()` gives the prompts' logits and cache, each prompt's row already repeated
    `num_beams` times (`[prompts * num_beams, V]`); `embed(ids [R], out [R, 1, D])` writes the next tokens'
    embeddings into the cache's step buffer; `processors` were built for the repeated rows. `fill_id` pads a
    hypothesis after its end (transformers' output rows; not in the answers). With `settings.do_sample`, the warpers
    and candidates are drawn from a generator seeded with `settings.seed`. `deadline` (perf_counter): max_time's end.
    `stop_candidates(new_tokens [P, keep, n], logits [P * keep, V])`: which candidates the caller's stopping criteria
    end (`[P, keep]` bool; the logits are those of the hypothesis each continues)."""
    nb, max_new_tokens, eos = settings.num_beams, settings.max_new_tokens, np.array(eos_token_ids, dtype=np.int64)
    length_penalty, early_stopping = settings.length_penalty, settings.early_stopping
    keep = max(2, 1 + len(eos)) * nb
    rng = np.random.default_rng(settings.seed) if settings.do_sample else None
    # transformers' min_tokens_to_keep for beams, so that a continuation that is no EOS survives: one more than the EOS
    # ids; 2 where there are none, but 1 where the caller gave an empty list (eos_token_id=[], a tensor of none there).
    min_keep = len(eos) + 1 if len(eos) or settings.eos_token_id == () else 2
    warpers = (
        settings.temperature, settings.top_k, settings.top_p, settings.min_p, settings.typical_p, settings.epsilon_cutoff, settings.eta_cutoff, min_keep,
    )
    prompt_offsets = (np.arange(prompts) * nb)[:, None]  # [P, 1]: each prompt's first row
    # New tokens of each hypothesis, [P, beams, max_new_tokens], padded with fill_id.
    running = np.full((prompts, nb, max_new_tokens), fill_id, dtype=np.int64)
    running_scores = np.zeros((prompts, nb), np.float32)
    running_scores[:, 1:] = RULED_OUT  # at first every row is the same: only one may continue
    finished = np.full((prompts, nb, max_new_tokens), fill_id, dtype=np.int64)
    finished_scores = np.full((prompts, nb), RULED_OUT, np.float32)
    finished_lengths = np.zeros((prompts, nb), np.int64)
    is_finished = np.zeros((prompts, nb), bool)
    finished_stopped = np.zeros((prompts, nb), bool)  # a finished hypothesis the caller's criteria ended
    improvable = np.ones((prompts, 1), bool)  # transformers' is_early_stop_heuristic_unsatisfied
    in_top_beams = np.arange(keep) < nb  # [keep]: candidates that may finish (the rest only back the running ones)

    prefill_start = time.perf_counter()
    logits, cache = prefill()
    decode_start = time.perf_counter()
    metrics.prefill_s = decode_start - prefill_start
    metrics.time_to_first_token_s = decode_start - started
    try:
        for step in range(max_new_tokens):
            if not np.isfinite(logits.sum()):
                raise FloatingPointError(f"the decoder returned non-finite logits at new token {step + 1}: {non_finite_hint(decoder)}")
            log_probs = log_softmax(logits)  # [P * nb, V]
            for process in processors:
                process(log_probs)
            if rng is not None:
                log_probs = warped_scores(log_probs, *warpers)
            if settings.renormalize_logits:  # (transformers' LogitNormalization, after the warpers)
                log_probs = log_softmax(log_probs)
            vocab = log_probs.shape[1]
            accumulated = (log_probs.reshape(prompts, nb, vocab) + running_scores[:, :, None]).reshape(prompts, nb * vocab)

            # The best `keep` continuations of each prompt: which hypothesis each continues, and its token.
            top = _top(accumulated, keep) if rng is None else _drawn(accumulated, keep, rng)  # [P, keep]
            top_scores = np.take_along_axis(accumulated, top, axis=1)
            source, tokens = top // vocab, top % vocab
            candidates = np.take_along_axis(running, source[:, :, None], axis=1)  # [P, keep, max_new_tokens]
            candidates[:, :, step] = tokens
            ends = (tokens[:, :, None] == eos).any(axis=2) if len(eos) else np.zeros_like(tokens, dtype=bool)
            # (max_time, as transformers' MaxTimeCriteria: every candidate ends here, as at max_new_tokens)
            ends |= step + 1 >= max_new_tokens or time.perf_counter() > deadline  # [P, keep]
            stopped = np.zeros_like(ends)
            if stop_candidates is not None:
                stopped = stop_candidates(candidates[:, :, : step + 1], logits[(prompt_offsets + source).reshape(-1)])
                ends |= stopped

            # Running on: the best `nb` candidates that do not end here.
            running_candidates = top_scores + ends.astype(np.float32) * RULED_OUT
            chosen = _top(running_candidates, nb)  # [P, nb]
            running = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
            running_scores = np.take_along_axis(running_candidates, chosen, axis=1)
            continued = np.take_along_axis(source, chosen, axis=1)  # [P, nb]: the hypothesis each row continues

            # Finished: the best `nb` of those already finished and the top candidates that end here.
            just_finished = ends & in_top_beams[None, :]
            scores = top_scores / np.float32((step + 1) ** length_penalty)
            if early_stopping is True:
                scores += (is_finished.all(axis=1, keepdims=True)).astype(np.float32) * RULED_OUT
            scores += (~improvable).astype(np.float32) * RULED_OUT
            scores += (~just_finished).astype(np.float32) * RULED_OUT
            merged_scores = np.concatenate([finished_scores, scores], axis=1)
            best = _top(merged_scores, nb)
            finished = np.take_along_axis(np.concatenate([finished, candidates], axis=1), best[:, :, None], axis=1)
            finished_scores = np.take_along_axis(merged_scores, best, axis=1)
            finished_lengths = np.take_along_axis(np.concatenate([finished_lengths, np.full((prompts, keep), step + 1)], axis=1), best, axis=1)
            is_finished = np.take_along_axis(np.concatenate([is_finished, just_finished], axis=1), best, axis=1)
            finished_stopped = np.take_along_axis(np.concatenate([finished_stopped, stopped], axis=1), best, axis=1)
            metrics.generated_tokens = step + 1

            # Could a running hypothesis still beat a finished one? (transformers' _check_early_stop_heuristic)
            best_length = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
            best_running = running_scores[:, :1] / np.float32(best_length**length_penalty)
            worst_finished = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), RULED_OUT)
            improvable &= (best_running > worst_finished).any(axis=1, keepdims=True)
            all_full = is_finished.all() and early_stopping is True
            if not improvable.any() or all_full or ends.all():
                break

            rows = (prompt_offsets + continued).reshape(-1)
            decoder.reorder_rows(cache, rows)
            for process in processors:
                process.reorder(rows)
                process.picked(running[:, :, step].reshape(-1))
            embed(running[:, :, step].reshape(-1), cache.step_embeds)
            logits = decoder.step(cache)
    finally:
        metrics.decode_s = time.perf_counter() - decode_start
        decoder.release(cache)
    count = settings.num_return_sequences
    return BeamAnswers(
        tokens=[[finished[p, i, : finished_lengths[p, i]].tolist() for i in range(count)] for p in range(prompts)],
        scores=[[float(finished_scores[p, i]) for i in range(count)] for p in range(prompts)],
        stopped=[[bool(finished_stopped[p, i]) for i in range(count)] for p in range(prompts)],
    )
