"""Samplers: small closures from last-position logits `[B, V]` to next tokens `[B]`.

Logits processors and warpers apply in transformers' order: the repetition penalty, no-repeat n-grams, min_new_tokens;
then, when sampling, temperature, top-k, top-p and min-p.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Sampler = Callable[[np.ndarray], np.ndarray]
TOP_P_PROBE = 64  # top-p alone first looks at this many most probable tokens


def greedy(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def make_sampler(
    do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None, min_p: float = 0.0,
) -> Sampler:
    """Greedy unless `do_sample`; a sampler with a `seed` repeats exactly.

    Each row draws from its candidates only (top-k's, then top-p's, ascending token ids). With top-k a token
    costs one partition of the vocabulary; top-p alone sorts only the most probable tokens when few of them hold
    the mass, else the whole vocabulary.
    """
    if not do_sample:
        return greedy
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must lie in [0, 1], got {min_p}")
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> np.ndarray:
        draws = rng.random(logits.shape[0])  # one uniform number per row
        tokens = np.empty(logits.shape[0], dtype=np.int64)
        for row, (scores, draw) in enumerate(zip(logits, draws)):
            candidates, probs = candidate_probs(scores, temperature, top_k, top_p, min_p)
            tokens[row] = candidates[min(int(np.count_nonzero(probs.cumsum() < draw)), len(probs) - 1)]
        return tokens

    return sample


def candidate_probs(scores: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One row's logits `[V]` -> the tokens that may be drawn (ascending ids) and their probabilities (float64,
    summing to 1): transformers' temperature, top-k, top-p and min-p warpers, then softmax."""
    candidates = _top_k(scores, top_k)
    values = scores[candidates].astype(np.float64) / temperature
    finite = np.isfinite(values)
    if not finite.all():  # -inf: tokens forbidden (min_new_tokens) are no candidates, even where top-k counts them
        candidates, values = candidates[finite], values[finite]
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    if top_p < 1.0:
        kept = _top_p(probs, top_p)
        candidates, probs = candidates[kept], probs[kept] / probs[kept].sum()
    if min_p > 0:  # (the ratio to the most probable token is the same before and after top-p's renormalizing)
        kept = probs >= min_p * probs.max()
        candidates, probs = candidates[kept], probs[kept] / probs[kept].sum()
    return candidates, probs


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


def with_repetition_penalty(sampler: Sampler, prompt_ids: np.ndarray, prompt_mask: np.ndarray, vocab_size: int, penalty: float) -> Sampler:
    """transformers' repetition penalty: logits of tokens already in the sequence (the prompt included, less each
    row's leading padding: its tokens before the first `prompt_mask != 0`, as transformers leaves out) are divided by
    `penalty` when positive, multiplied when negative.

    `prompt_ids`, `prompt_mask`: `[B, T]`.
    """
    if penalty == 1.0:
        return sampler
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    batch = prompt_ids.shape[0]
    seen = np.zeros(batch * vocab_size, dtype=bool)  # [B * V] flat: row b's token t at b * V + t
    row_offsets = np.arange(batch) * vocab_size
    counted = np.arange(prompt_ids.shape[1]) >= (prompt_mask != 0).argmax(axis=1)[:, None]  # (a row of zeros: all counted)
    seen[(row_offsets[:, None] + np.clip(prompt_ids, 0, vocab_size - 1))[counted]] = True
    # The same, as indices (a step touches only these entries), in a buffer that doubles when full.
    seen_at = np.flatnonzero(seen)
    count = len(seen_at)
    scores = None  # [B, V]: the penalized logits, reused (the decoder's own buffer stays raw, for output_logits)

    def sample(logits: np.ndarray) -> np.ndarray:
        nonlocal seen_at, count, scores
        if scores is None or scores.shape != logits.shape:
            scores = np.empty_like(logits)
        np.copyto(scores, logits)
        flat = scores.reshape(-1)
        held = seen_at[:count]
        picked = flat[held]
        flat[held] = np.where(picked < 0, picked * penalty, picked / penalty)
        tokens = sampler(scores)
        new = row_offsets + tokens
        new = np.unique(new[~seen[new]])
        if len(new):
            seen[new] = True
            if count + len(new) > len(seen_at):
                seen_at = np.concatenate([seen_at[:count], np.empty(max(count, len(new), 64), np.int64)])
            seen_at[count : count + len(new)] = new
            count += len(new)
        return tokens

    return sample


def with_no_repeat_ngrams(sampler: Sampler, prompt_ids: np.ndarray, vocab_size: int, size: int) -> Sampler:
    """transformers' `no_repeat_ngram_size`: a token that would complete an n-gram already in the row (its prompt
    ids as given, padding and image tokens included, as transformers counts them; then its new tokens) is
    forbidden. `prompt_ids`: `[B, T]`.

    Each row keeps a table from every (n-1)-gram it holds to the tokens that followed it, so a step costs a lookup
    and an insert per row, whatever the length.
    """
    if size <= 0:
        return sampler
    rows = [list(map(int, row)) for row in prompt_ids]  # each row's ids so far: its last n-1 are the next key
    followers: list[dict[tuple[int, ...], set[int]]] = []
    for ids in rows:
        table: dict[tuple[int, ...], set[int]] = {}
        for start in range(len(ids) - size + 1):
            table.setdefault(tuple(ids[start : start + size - 1]), set()).add(ids[start + size - 1])
        followers.append(table)
    scores = None  # [B, V]: the masked logits, reused (the decoder's own buffer stays raw, for output_logits)

    def sample(logits: np.ndarray) -> np.ndarray:
        nonlocal scores
        banned = [
            [t for t in table.get(tuple(ids[len(ids) - size + 1 :]), ()) if t < vocab_size] if len(ids) >= size - 1 else []
            for ids, table in zip(rows, followers)
        ]
        if any(banned):
            if scores is None or scores.shape != logits.shape:
                scores = np.empty_like(logits)
            np.copyto(scores, logits)
            for row, tokens in enumerate(banned):
                scores[row, tokens] = -np.inf
            logits = scores
        tokens = sampler(logits)
        for ids, table, token in zip(rows, followers, tokens.tolist()):
            ids.append(token)
            if len(ids) >= size:
                table.setdefault(tuple(ids[len(ids) - size : -1]), set()).add(token)
        return tokens

    return sample


def _top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Ascending ids of the tokens whose score reaches the k-th largest (ties kept, as transformers); all when off."""
    if not top_k or top_k >= len(scores):
        return np.arange(len(scores))
    kth = np.partition(scores, -top_k)[-top_k]
    return np.flatnonzero(scores >= kth)


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """`[len(probs)]` bool: the smallest set of most probable tokens whose mass reaches `top_p` (at least one), by
    transformers' rule: a token goes when the ascending cumulative mass up to it is <= 1 - top_p."""
    # Only the most probable tokens can stay: when the 64 largest hold top_p of the mass, sorting them is enough
    # (any other token has at least that much mass above it); otherwise sort them all.
    if len(probs) > TOP_P_PROBE:
        largest = np.argpartition(probs, -TOP_P_PROBE)[-TOP_P_PROBE:]
        order = largest[np.argsort(probs[largest])] if probs[largest].sum() >= top_p else np.argsort(probs)
    else:
        order = np.argsort(probs)  # ascending probability
    ordered = probs[order]
    below = 1.0 - ordered[::-1].cumsum()[::-1] + ordered  # the mass up to each, from the least probable
    kept = np.zeros(len(probs), dtype=bool)
    kept[order[below > 1.0 - top_p]] = True
    kept[order[-1]] = True
    return kept
