"""Logits processors: what transformers applies to the logits before any sampling (greedy too), in its order.

Each processor changes a working copy of the last position's logits `[B, V]` in place (`__call__`), then hears the
tokens picked from it (`picked`), which the stateful ones (the repetition penalty, n-grams, sequences) add to each
row's history. Beam search, whose rows continue other rows, first has them take the rows' histories over
(`reorder`); one that holds more than its state (the guidance pass's cache) lets it go at the end (`close`, where
it has one: `close_processors`). `with_processors` puts them in front of a sampler: one copy of the decoder's logits
a step, into a buffer it reuses, and none where no processor is on (the decoder's own buffer stays raw, for
`output_logits`).

Rows are the batch's (a prompt's copies under `num_return_sequences` included); `prompt_ids [B, T]` are each row's
ids as transformers' `input_ids` hold them: left padding and image tokens included.
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import numpy as np

from .sampling import Sampler
from .settings import GenerationSettings


class LogitsProcessor(Protocol):
    def __call__(self, scores: np.ndarray) -> None:
        """Changes `scores [B, V]` (float32, the step's working copy) in place."""

    def picked(self, tokens: np.ndarray) -> None:
        """Hears the step's tokens `[B]`, picked from the changed scores."""

    def reorder(self, rows: np.ndarray) -> None:
        """Row i's history becomes that of row `rows[i]` (beam search, before `picked`)."""


def with_processors(sampler: Sampler, processors: Iterable[LogitsProcessor | None]) -> Sampler:
    """`sampler` behind `processors` (None: off), applied in the order given. A processor whose work is over
    (`expired`: min_new_tokens' EOS ban once that many tokens are out) is dropped; one with nothing to do at this
    step (`idle`: forced EOS before the last token) is left out of it; a step where none acts samples from the
    logits uncopied."""
    processors = [p for p in processors if p is not None]
    if not processors:
        return sampler
    scores: np.ndarray | None = None  # [B, V]: the processed logits, reused

    def sample(logits: np.ndarray) -> np.ndarray:
        nonlocal scores, processors
        if not processors:
            return sampler(logits)
        acting = [process for process in processors if not getattr(process, "idle", False)]
        if acting:
            if scores is None or scores.shape != logits.shape:
                scores = np.empty_like(logits)
            np.copyto(scores, logits)
            for process in acting:
                process(scores)
        tokens = sampler(scores if acting else logits)
        for process in processors:
            process.picked(tokens)
        if any(getattr(process, "expired", False) for process in processors):
            processors = [p for p in processors if not getattr(p, "expired", False)]
        return tokens

    return sample


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """`[R, V]` float32 logits -> float32 log-probabilities (the exponentials summed in float64, then rounded; torch's
    order of operations: x - max - log(sum))."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    total = np.log(np.exp(shifted).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    shifted -= total
    return shifted


def close_processors(processors: Iterable[LogitsProcessor]) -> None:
    """Lets go of what processors hold past a generation (the guidance pass's cache); the others hold nothing."""
    for process in processors:
        close = getattr(process, "close", None)
        if close is not None:
            close()


class ForbidTokens:
    """Sets `token_ids` to -inf for the first `steps` steps (None: every step). transformers' `min_new_tokens` and
    `min_length` (the EOS ids, until that many tokens are out), `suppress_tokens` (always) and
    `begin_suppress_tokens` (the first new token only)."""

    def __init__(self, token_ids: Sequence[int], steps: int | None = None):
        self.token_ids = np.array(sorted(set(token_ids)), dtype=np.int64)
        self.steps = steps
        self.done = 0

    @property
    def expired(self) -> bool:
        return self.steps is not None and self.done >= self.steps

    def __call__(self, scores: np.ndarray) -> None:
        if not self.expired:
            scores[:, self.token_ids] = -np.inf

    def picked(self, tokens: np.ndarray) -> None:
        self.done += 1

    def reorder(self, rows: np.ndarray) -> None:
        pass  # (every row alike)


class ForceTokens:
    """At step `step` (0: the first new token), only `token_ids` may be picked: transformers' `forced_eos_token_id`,
    which ends an answer that reaches its last token with one of them."""

    def __init__(self, token_ids: Sequence[int], step: int):
        self.token_ids = np.array(sorted(set(token_ids)), dtype=np.int64)
        self.step = step
        self.done = 0

    @property
    def idle(self) -> bool:
        return self.done != self.step

    def __call__(self, scores: np.ndarray) -> None:
        if not self.idle:
            scores[:] = -np.inf
            scores[:, self.token_ids] = 0.0

    def picked(self, tokens: np.ndarray) -> None:
        self.done += 1

    def reorder(self, rows: np.ndarray) -> None:
        pass  # (every row alike)


class DecayLengthPenalty:
    """transformers' `exponential_decay_length_penalty=(start, factor)`: once more than `start` new tokens are out (n of
    them), each EOS logit x grows by |x| * (factor ** (n - start) - 1), so an answer tends to end there without a hard
    cut; a non-finite EOS logit is left as it is."""

    def __init__(self, start: int, factor: float, eos_token_ids: Sequence[int]):
        self.start, self.factor = int(start), float(factor)
        self.eos = np.array(sorted(set(eos_token_ids)), dtype=np.int64)
        self.done = 0  # new tokens so far

    @property
    def idle(self) -> bool:
        return self.done <= self.start

    def __call__(self, scores: np.ndarray) -> None:
        if self.idle:
            return
        eos = scores[:, self.eos]
        growth = np.abs(eos) * (self.factor ** (self.done - self.start) - 1)  # (float32, the factor rounded to it, as torch)
        scores[:, self.eos] = eos + np.where(np.isfinite(eos), growth, 0)

    def picked(self, tokens: np.ndarray) -> None:
        self.done += 1

    def reorder(self, rows: np.ndarray) -> None:
        pass  # (every row alike)


class RepetitionPenalty:
    """transformers' repetition penalty: logits of tokens already in the row (the prompt included, less its leading
    padding: the tokens before the first `prompt_mask != 0`, as transformers leaves out) are divided by `penalty` when
    positive, multiplied when negative. `prompt_ids`, `prompt_mask`: `[B, T]`.

    The tokens seen are kept as flat indices into `[B, V]` (a step touches only these), in a buffer that doubles when
    full."""

    def __init__(self, prompt_ids: np.ndarray, prompt_mask: np.ndarray, vocab_size: int, penalty: float):
        batch = prompt_ids.shape[0]
        self.penalty = penalty
        self.vocab_size = vocab_size
        self.seen = np.zeros(batch * vocab_size, dtype=bool)  # row b's token t at b * V + t
        self.row_offsets = np.arange(batch) * vocab_size
        counted = np.arange(prompt_ids.shape[1]) >= (prompt_mask != 0).argmax(axis=1)[:, None]  # (a row of zeros: all counted)
        counted &= (prompt_ids >= 0) & (prompt_ids < vocab_size)  # (an id past the logits has none to penalize, as in transformers)
        self.seen[(self.row_offsets[:, None] + prompt_ids)[counted]] = True
        self.seen_at = np.flatnonzero(self.seen)
        self.count = len(self.seen_at)

    def __call__(self, scores: np.ndarray) -> None:
        flat = scores.reshape(-1)
        held = self.seen_at[: self.count]
        picked = flat[held]
        flat[held] = np.where(picked < 0, picked * self.penalty, picked / self.penalty)

    def picked(self, tokens: np.ndarray) -> None:
        new = self.row_offsets + tokens
        new = np.unique(new[~self.seen[new]])
        if len(new):
            self.seen[new] = True
            if self.count + len(new) > len(self.seen_at):
                self.seen_at = np.concatenate([self.seen_at[: self.count], np.empty(max(self.count, len(new), 64), np.int64)])
            self.seen_at[self.count : self.count + len(new)] = new
            self.count += len(new)

    def reorder(self, rows: np.ndarray) -> None:
        if np.array_equal(rows, np.arange(len(rows))):
            return
        self.seen = self.seen.reshape(len(self.row_offsets), self.vocab_size)[rows].reshape(-1)
        self.seen_at = np.flatnonzero(self.seen)
        self.count = len(self.seen_at)


class PromptRepetitionPenalty:
    """transformers' `encoder_repetition_penalty` (for a decoder-only model, the prompt is the "encoder" input): the
    logits of the tokens in the row's prompt ids (as given: padding and image tokens included) are multiplied by
    `penalty` when negative and divided by it otherwise, the inverse of the repetition penalty, so that a penalty > 1
    favours the prompt's tokens (transformers calls it a hallucination penalty). The new tokens do not count.
    `prompt_ids`: `[B, T]`."""

    def __init__(self, prompt_ids: np.ndarray, vocab_size: int, penalty: float):
        self.inverse = 1 / penalty  # (as transformers keeps it, so the float32 results are its own)
        ids = np.where(prompt_ids < vocab_size, prompt_ids, -1)  # (an id past the logits has no logit to change)
        flat = np.arange(len(ids))[:, None] * vocab_size + ids
        self.at = np.unique(flat[ids >= 0])  # [n] flat indices into [B, V]

    def __call__(self, scores: np.ndarray) -> None:
        flat = scores.reshape(-1)
        held = flat[self.at]
        flat[self.at] = np.where(held < 0, held * self.inverse, held / self.inverse)

    def picked(self, tokens: np.ndarray) -> None:
        pass  # (the prompt's tokens only)

    def reorder(self, rows: np.ndarray) -> None:
        pass  # (rows reorder within a prompt's beams, which share its ids)


class NoRepeatNGrams:
    """transformers' `no_repeat_ngram_size`: a token that would complete an n-gram already in the row (its prompt ids
    as given, padding and image tokens included, as transformers counts them; then its new tokens) is forbidden.
    With `prompt_only`, transformers' `encoder_no_repeat_ngram_size` (for a decoder-only model, the prompt is the
    "encoder" input): only the prompt's n-grams are forbidden, so an answer may repeat itself but not the prompt.

    Each row keeps a table from every (n-1)-gram it holds to the tokens that followed it, so a step costs a lookup
    and an insert per row, whatever the length."""

    def __init__(self, prompt_ids: np.ndarray, size: int, prompt_only: bool = False):
        self.size = size
        self.prompt_only = prompt_only
        self.rows = [list(map(int, row)) for row in prompt_ids]  # each row's ids so far: its last n-1 are the next key
        self.followers: list[dict[tuple[int, ...], set[int]]] = []
        for ids in self.rows:
            table: dict[tuple[int, ...], set[int]] = {}
            for start in range(len(ids) - size + 1):
                table.setdefault(tuple(ids[start : start + size - 1]), set()).add(ids[start + size - 1])
            self.followers.append(table)

    def __call__(self, scores: np.ndarray) -> None:
        size, vocab = self.size, scores.shape[1]
        for row, (ids, table) in enumerate(zip(self.rows, self.followers)):
            if len(ids) >= size - 1:
                banned = [t for t in table.get(tuple(ids[len(ids) - size + 1 :]), ()) if t < vocab]
                if banned:
                    scores[row, banned] = -np.inf

    def picked(self, tokens: np.ndarray) -> None:
        size = self.size
        for ids, table, token in zip(self.rows, self.followers, tokens.tolist()):
            ids.append(token)
            if len(ids) >= size and not self.prompt_only:
                table.setdefault(tuple(ids[len(ids) - size : -1]), set()).add(token)

    def reorder(self, rows: np.ndarray) -> None:
        # A row continued once takes its history over as it is; only a row continued again needs a copy. A table of
        # the prompt's alone stays with its row, as transformers keeps it (rows reorder within a prompt's beams).
        taken: set[int] = set()
        ids, followers = [], []
        for row in rows.tolist():
            again = row in taken
            taken.add(row)
            ids.append(list(self.rows[row]) if again else self.rows[row])
            if not self.prompt_only:
                table = self.followers[row]
                followers.append({key: set(tokens) for key, tokens in table.items()} if again else table)
        self.rows = ids
        if not self.prompt_only:
            self.followers = followers


class SequenceBias:
    """transformers' `sequence_bias` (and `bad_words_ids`, a bias of -inf): a sequence's bias is added to its last
    token's logit where the row's ids (prompt included) end with the rest of it; a one-token sequence's, always.
    Biases of sequences that share a last token add up. `biases`: (token ids, bias) pairs.

    The float32 sums are transformers' own: a token's biases are summed first (its one-token bias, then the longer
    sequences grouped by prefix length, each group in the order given), then added to its logit once. A step looks
    only at the sequences whose prefix ends with the row's last token."""

    def __init__(self, biases: Sequence[tuple[Sequence[int], float]], prompt_ids: np.ndarray, vocab_size: int):
        outside = sorted({t for ids, _ in biases for t in ids if t >= vocab_size})
        if outside:
            raise ValueError(f"the model's vocabulary has {vocab_size} tokens, but these are biased or banned: {outside}")
        merged = {tuple(int(t) for t in ids): float(bias) for ids, bias in biases}  # (a sequence given twice: the last bias)
        self.single = np.zeros(vocab_size, dtype=np.float32)  # [V]: one-token sequences' biases
        self.has_single = False
        by_prefix_length: dict[int, list[tuple[tuple[int, ...], int, np.float32]]] = {}  # (prefix, last token, bias)
        for ids, bias in merged.items():
            if len(ids) == 1:
                self.single[ids[0]] = bias
                self.has_single = True
            else:
                by_prefix_length.setdefault(len(ids) - 1, []).append((ids[:-1], ids[-1], np.float32(bias)))
        # The longer sequences in transformers' summing order, keyed by their prefix's last token.
        self.continuing: dict[int, list[tuple[tuple[int, ...], int, np.float32]]] = {}
        for group in by_prefix_length.values():
            for prefix, last, bias in group:
                self.continuing.setdefault(prefix[-1], []).append((prefix, last, bias))
        longest = max(by_prefix_length, default=0)
        self.tails = [list(map(int, row[max(0, len(row) - longest) :])) for row in prompt_ids] if longest else []
        self.longest = longest

    def __call__(self, scores: np.ndarray) -> None:
        summed: list[tuple[int, int, np.float32, np.float32]] = []  # (row, token, its logit, its biases' sum)
        for row, tail in enumerate(self.tails):
            totals: dict[int, np.float32] = {}
            for prefix, last, bias in self.continuing.get(tail[-1], ()) if tail else ():
                if len(prefix) <= len(tail) and tuple(tail[len(tail) - len(prefix) :]) == prefix:
                    totals[last] = totals.get(last, self.single[last]) + bias
            summed += [(row, last, scores[row, last], total) for last, total in totals.items()]
        if self.has_single:
            scores += self.single
        for row, last, logit, total in summed:
            scores[row, last] = logit + total

    def picked(self, tokens: np.ndarray) -> None:
        for tail, token in zip(self.tails, tokens.tolist()):
            tail.append(token)
            if len(tail) > self.longest:
                del tail[0]

    def reorder(self, rows: np.ndarray) -> None:
        self.tails = [list(self.tails[row]) for row in rows] if self.tails else []


def bad_words(bad_words_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int], prompt_ids: np.ndarray, vocab_size: int) -> SequenceBias | None:
    """transformers' `bad_words_ids`: sequences never completed (a one-token EOS sequence is left out, as transformers
    leaves it, so an answer can still end)."""
    banned = [tuple(ids) for ids in bad_words_ids if not (len(ids) == 1 and ids[0] in eos_token_ids)]
    return SequenceBias([(ids, -np.inf) for ids in banned], prompt_ids, vocab_size) if banned else None


def for_settings(
    settings: GenerationSettings, prompt_ids: np.ndarray, prompt_mask: np.ndarray, eos_token_ids: Sequence[int], vocab_size: int,
    prefix_constraint: LogitsProcessor | None = None, guidance: LogitsProcessor | None = None,
) -> list[LogitsProcessor]:
    """The processors `settings` turn on, in transformers' order. `prompt_ids`, `prompt_mask`: `[B, T]`, one row per
    answer; `settings.max_new_tokens` is the run's (after `for_prompt`). `prefix_constraint`: the caller's
    `prefix_allowed_tokens_fn` as a processor (`caller_hooks.PrefixConstrained`); `guidance`: classifier-free
    guidance (`guidance.ClassifierFreeGuidance`); each put where transformers puts it."""
    prompt_width = prompt_ids.shape[1]
    forced_eos = settings.forced_eos_token_id
    forced_eos = [forced_eos] if isinstance(forced_eos, (int, np.integer)) else list(forced_eos or ())
    outside = [i for i in forced_eos if i >= vocab_size]  # (suppressed ids past it suppress nothing, as in transformers: left out below)
    if outside:
        raise ValueError(f"forced_eos_token_id {outside[0]} is not in the model's vocabulary of {vocab_size}")
    processors: list[LogitsProcessor | None] = [
        guidance,
        SequenceBias(settings.sequence_bias, prompt_ids, vocab_size) if settings.sequence_bias else None,
        PromptRepetitionPenalty(prompt_ids, vocab_size, settings.encoder_repetition_penalty) if settings.encoder_repetition_penalty != 1.0 else None,
        RepetitionPenalty(prompt_ids, prompt_mask, vocab_size, settings.repetition_penalty) if settings.repetition_penalty != 1.0 else None,
        NoRepeatNGrams(prompt_ids, settings.no_repeat_ngram_size) if settings.no_repeat_ngram_size > 0 else None,
        NoRepeatNGrams(prompt_ids, settings.encoder_no_repeat_ngram_size, prompt_only=True) if settings.encoder_no_repeat_ngram_size > 0 else None,
        bad_words(settings.bad_words_ids, eos_token_ids, prompt_ids, vocab_size) if settings.bad_words_ids else None,
        ForbidTokens(eos_token_ids, settings.min_length - prompt_width) if settings.min_length > prompt_width and eos_token_ids else None,
        ForbidTokens(eos_token_ids, settings.min_new_tokens) if settings.min_new_tokens > 0 and eos_token_ids else None,
        prefix_constraint,
        ForceTokens(forced_eos, settings.max_new_tokens - 1) if forced_eos else None,
        DecayLengthPenalty(*settings.exponential_decay_length_penalty, eos_token_ids) if settings.exponential_decay_length_penalty and eos_token_ids else None,
        ForbidTokens(suppressed) if (suppressed := [i for i in settings.suppress_tokens or () if i < vocab_size]) else None,
        ForbidTokens(at_begin, 1) if (at_begin := [i for i in settings.begin_suppress_tokens or () if i < vocab_size]) else None,
    ]
    return [p for p in processors if p is not None]
