"""Samplers: small closures from last-position logits `[B, V]` to next tokens `[B]`.

A sampling one applies transformers' warpers in its order: temperature, top-k, top-p, min-p, typical-p, epsilon and eta
cutoffs. The logits processors, which apply before any sampler (greedy too), are in logits_processors.py. Beam sampling
(beam_search.py) takes the warpers' scores (`warped_scores`) and draws several continuations at once
(`draw_without_replacement`).
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
    typical_p: float = 1.0, epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0,
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
    if not 0 < typical_p <= 1:
        raise ValueError(f"typical_p must lie in (0, 1], got {typical_p}")
    for name, cutoff in (("epsilon_cutoff", epsilon_cutoff), ("eta_cutoff", eta_cutoff)):
        if not 0 <= cutoff < 1:
            raise ValueError(f"{name} must lie in [0, 1) (0: off), got {cutoff}")
    cutoffs = dict(min_p=min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff)
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> np.ndarray:
        draws = rng.random(logits.shape[0])  # one uniform number per row
        tokens = np.empty(logits.shape[0], dtype=np.int64)
        for row, (scores, draw) in enumerate(zip(logits, draws)):
            candidates, probs = candidate_probs(scores, temperature, top_k, top_p, **cutoffs)
            tokens[row] = candidates[min(int(np.count_nonzero(probs.cumsum() < draw)), len(probs) - 1)]
        return tokens

    return sample


def candidate_probs(
    scores: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float = 0.0, typical_p: float = 1.0,
    epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0, min_keep: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """One row's logits `[V]` -> the tokens that may be drawn (ascending ids) and their probabilities (float64,
    summing to 1): transformers' temperature, top-k, top-p, min-p, typical-p, epsilon and eta warpers, then softmax.

    Each warper sees the probabilities the ones before it left (renormalized, as transformers' softmax of the
    filtered logits gives them); each keeps at least `min_keep` tokens (transformers' `min_tokens_to_keep`: 1 when
    sampling, one more than the EOS ids in beam sampling), chosen by transformers' rule (where tokens tie at that
    boundary, min-p keeps them all, and top-p's order among them may differ from torch's sort)."""
    candidates = _top_k(scores, max(top_k, min_keep) if top_k else 0)
    values = scores[candidates].astype(np.float64) / temperature
    if not np.isfinite(values).all():
        if np.isnan(values).any():
            raise ValueError("a row's scores hold NaN after the logits processors (a caller's logits_processor?): nothing to sample from")
        # +inf: tokens forced (a caller's processor, an exponential decay penalty grown past float32), which take all
        # of softmax's mass, shared; -inf: tokens forbidden, no candidates even where top-k counts them.
        forced = values == np.inf
        kept = forced if forced.any() else values != -np.inf
        if not kept.any():
            raise ValueError(
                "every token of a row is forbidden (by bad_words_ids, suppress_tokens, no-repeat n-grams, "
                "prefix_allowed_tokens_fn or a caller's logits_processor): nothing to sample from"
            )
        candidates, values = candidates[kept], np.where(forced[kept], 0.0, values[kept])
    probs = np.exp(values - values.max())
    probs /= probs.sum()
    if top_p < 1.0:
        kept = _top_p(probs, top_p, min_keep)
        candidates, probs = candidates[kept], probs[kept] / probs[kept].sum()
    if min_p > 0:  # (the ratio to the most probable token is the same before and after top-p's renormalizing)
        kept = (probs >= min_p * probs.max()) | _largest(probs, min_keep)
        candidates, probs = candidates[kept], probs[kept] / probs[kept].sum()
    if typical_p < 1.0:
        kept = _typical(probs, typical_p, min_keep)
        candidates, probs = candidates[kept], probs[kept] / probs[kept].sum()
    if epsilon_cutoff > 0:
        kept = (probs >= epsilon_cutoff) | _largest(probs, min_keep)
        candidates, probs = candidates[kept], probs[kept] / probs[kept].sum()
    if eta_cutoff > 0:  # epsilon's cut, lowered where the distribution is flat: min(eps, sqrt(eps) * e^-entropy)
        entropy = -np.sum(probs * np.log(probs, where=probs > 0, out=np.zeros_like(probs)))
        kept = (probs >= min(eta_cutoff, np.sqrt(eta_cutoff) * np.exp(-entropy))) | _largest(probs, min_keep)
        candidates, probs = candidates[kept], probs[kept] / probs[kept].sum()
    return candidates, probs


def warped_scores(
    scores: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float, typical_p: float, epsilon_cutoff: float,
    eta_cutoff: float, min_keep: int,
) -> np.ndarray:
    """`[R, V]` float32 scores -> `[R, V]` float32 as transformers' warpers leave them: each row's candidates
    (`candidate_probs`) at score / temperature, every other token at -inf. Beam sampling adds these to the
    hypotheses' scores; a row costs what a sampled token does."""
    warped = np.full_like(scores, -np.inf)
    divisor = np.float32(temperature)
    for row, out in zip(scores, warped):
        if row.max() == -np.inf:  # every token forbidden (a hypothesis the bans end): it stays at -inf
            continue
        candidates, _ = candidate_probs(row, temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, min_keep)
        out[candidates] = row[candidates] / divisor
    return warped


def draw_without_replacement(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` distinct indices of `weights [N]` (>= 0, at least `count` of them > 0), drawn one after another, each
    with probability its weight over the weights not yet drawn (torch.multinomial's law without replacement): one
    uniform number per draw, inverse CDF. Zero weights are never drawn, so leaving them out changes nothing."""
    remaining = weights.astype(np.float64)  # (a copy: drawn weights are zeroed)
    picks = np.empty(count, dtype=np.int64)
    for i in range(count):
        cumulative = np.cumsum(remaining)
        # The first index whose cumulative weight passes the draw: a zero weight never does (it adds nothing).
        picks[i] = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(remaining) - 1)
        remaining[picks[i]] = 0.0
    return picks


def _largest(values: np.ndarray, k: int) -> np.ndarray:
    """`[len(values)]` bool: the values that reach the k-th largest (ties kept)."""
    if k <= 1:
        return values == values.max()
    if k >= len(values):
        return np.ones(len(values), dtype=bool)
    return values >= np.partition(values, -k)[-k]


def _top_k(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Ascending ids of the tokens whose score reaches the k-th largest (ties kept, as transformers); all when off.

    The k-th largest is found among a few hundred scores, not the whole vocabulary: cut the scores into k chunks; their
    k maxima are k different scores, so the k-th largest reaches the least of them, and only scores that reach it can
    be among the k (a sampled token's host time on a 32k vocabulary, top_k=50: ~50 us less than a partition of all).
    """
    if not top_k or top_k >= len(scores):
        return np.arange(len(scores))
    bound = scores[: len(scores) // top_k * top_k].reshape(top_k, -1).max(axis=1).min()
    near = np.flatnonzero(scores >= bound)  # (every score where -inf fills a whole chunk: as slow as before, as exact)
    kth = np.partition(scores[near], -top_k)[-top_k]
    return near[scores[near] >= kth]


def _top_p(probs: np.ndarray, top_p: float, min_keep: int = 1) -> np.ndarray:
    """`[len(probs)]` bool: the smallest set of most probable tokens whose mass reaches `top_p` (at least the
    `min_keep` most probable), by transformers' rule: a token goes when the ascending cumulative mass up to it is
    <= 1 - top_p."""
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
    kept[order[-min_keep:]] = True
    return kept


def _typical(probs: np.ndarray, mass: float, min_keep: int = 1) -> np.ndarray:
    """`[len(probs)]` bool: transformers' typical-p set. Tokens in order of how far their information (-log p) lies
    from the entropy; kept up to and including the first at which the mass so far reaches `mass` (every token as
    far as that one, ties included), and at least the `min_keep` nearest (as transformers keeps them: not the most
    probable)."""
    log_probs = np.log(probs, where=probs > 0, out=np.full_like(probs, -np.inf))
    entropy = -np.sum(np.where(probs > 0, probs * log_probs, 0.0))
    distance = np.abs(-log_probs - entropy)  # (inf for a probability that underflowed to 0: last)
    order = np.argsort(distance, kind="stable")
    last = min(int(np.count_nonzero(probs[order].cumsum() < mass)), len(probs) - 1)
    kept = distance <= distance[order[last]]
    kept[order[:min_keep]] = True
    return kept
