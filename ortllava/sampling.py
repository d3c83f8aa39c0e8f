"""Samplers: small closures from last-position logits `[B, V]` to next tokens `[B]`.

Warpers apply in transformers' order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Sampler = Callable[[np.ndarray], np.ndarray]


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def make_sampler(do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """Greedy unless `do_sample`; a sampler with a `seed` repeats exactly."""
    if not do_sample:
        return greedy
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> np.ndarray:
        scores = logits.astype(np.float64) / temperature
        if top_k and top_k < scores.shape[-1]:
            kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        if top_p < 1.0:
            scores = _top_p(scores, top_p)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        draws = rng.random((probs.shape[0], 1))
        return np.minimum((probs.cumsum(axis=-1) < draws).sum(axis=-1), probs.shape[-1] - 1)

    return sample


def with_min_new_tokens(sampler: Sampler, eos_token_ids: list[int], min_new_tokens: int) -> Sampler:
    """Forbids the EOS tokens for the first `min_new_tokens` calls (transformers' `min_new_tokens`)."""
    if min_new_tokens <= 0 or not eos_token_ids:
        return sampler
    eos = np.array(eos_token_ids, dtype=np.int64)
    calls = 0

    def sample(logits: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls <= min_new_tokens:
            logits = logits.copy()
            logits[:, eos] = -np.inf
        return sampler(logits)

    return sample


def with_repetition_penalty(sampler: Sampler, prompt_ids: np.ndarray, vocab_size: int, penalty: float) -> Sampler:
    """transformers' repetition penalty: logits of tokens already in the sequence (prompt included) are
    divided by `penalty` when positive, multiplied when negative."""
    if penalty == 1.0:
        return sampler
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    batch = prompt_ids.shape[0]
    seen = np.zeros(batch * vocab_size, dtype=bool)  # [B * V] flat: row b's token t at b * V + t
    row_offsets = np.arange(batch) * vocab_size
    seen[(row_offsets[:, None] + np.clip(prompt_ids, 0, vocab_size - 1)).ravel()] = True
    seen_at = np.flatnonzero(seen)  # the same, as indices: a step touches only these entries

    def sample(logits: np.ndarray) -> np.ndarray:
        nonlocal seen_at
        scores = logits.copy()
        flat = scores.reshape(-1)
        picked = flat[seen_at]
        flat[seen_at] = np.where(picked < 0, picked * penalty, picked / penalty)
        tokens = sampler(scores)
        new = row_offsets + tokens
        new = new[~seen[new]]
        if len(new):
            seen[new] = True
            seen_at = np.concatenate([seen_at, np.unique(new)])
        return tokens

    return sample


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """Keeps the smallest set of tokens whose probability reaches `top_p` (at least one)."""
    order = np.argsort(scores, axis=-1)  # ascending, as transformers
    ordered = np.take_along_axis(scores, order, axis=-1)
    probs = np.exp(ordered - ordered.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    remove = probs.cumsum(axis=-1) <= (1 - top_p)
    remove[:, -1] = False
    out = scores.copy()
    np.put_along_axis(out, order, np.where(remove, -np.inf, ordered), axis=-1)
    return out
