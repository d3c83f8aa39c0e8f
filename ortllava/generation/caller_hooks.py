"""The caller's own logits processors and stopping criteria: transformers' `logits_processor` and
`stopping_criteria` arguments, called as transformers calls them, over numpy arrays instead of torch tensors.

- a logits processor: `fn(input_ids, scores) -> scores`, `input_ids [B, T + n]` int64 and `scores [B, V]` float32 (the
  step's working copy: it may be changed in place and returned, or a new array returned; None counts as "changed in
  place"). They run after ortllava's own processors and before the sampling warpers (temperature, top-k, ...), in the
  order given, as transformers merges a caller's list. Under beam search they get each hypothesis' ids and the
  log-probabilities, as transformers' beam search gives them.
- `prefix_allowed_tokens_fn(prompt_index, ids) -> allowed token ids`: the tokens a row may take next, asked for each
  row with its ids `[T + n]` (`PrefixConstrained`; among ortllava's own processors, where transformers puts it).
- a stopping criterion: `fn(input_ids, logits) -> bool or [B] bool`, called after each new token with `input_ids
  [B, T + n + 1]` (the new token included) and the logits it was picked from: a row it marks True ends there
  (finish_reason "stop"), as a row that hit an EOS token. A criterion that reads an `Event` set by another thread
  cancels a generation that does not stream. Under beam search it is called on every candidate continuation (each
  prompt's best `keep`, as transformers' beam search calls it): a candidate it marks ends there, as at an EOS.

`input_ids` is each row as transformers' `input_ids` hold it: the left-padded prompt with its image tokens, then the
new tokens, a row that has ended being fed the pad id. The arrays are views into one buffer that the next step
writes: copy what is to be kept.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

CallerProcessor = Callable[[np.ndarray, np.ndarray], Any]  # (input_ids [B, T + n], scores [B, V]) -> scores [B, V] or None
CallerCriterion = Callable[[np.ndarray, np.ndarray], Any]  # (input_ids [B, T + n + 1], logits [B, V]) -> bool or [B] bool


class CallerHooks:
    """The ids so far and the caller's callables. A `LogitsProcessor` of the sampler's chain (`logits_processors`):
    `__call__` runs the caller's processors; `picked` hears each step's tokens; `reorder` follows beam search's rows.

    A step's tokens are written into the ids when they are next read (a processor's or a criterion's call), not when
    picked: the decode loop replaces the tokens of rows that have ended with the pad id in place in between, and
    transformers' `input_ids` hold that pad id."""

    def __init__(self, prompt_ids: np.ndarray, max_new_tokens: int, processors: Sequence[CallerProcessor], criteria: Sequence[CallerCriterion]):
        """`prompt_ids [B, T]`: each row's prompt (left padding and image tokens included)."""
        batch, width = prompt_ids.shape
        self.ids = np.empty((batch, width + max_new_tokens), np.int64)  # [B, T + max_new_tokens]: filled up to `length`
        self.ids[:, :width] = prompt_ids
        self.width = width  # T
        self.length = width
        self.processors = tuple(processors)
        self.criteria = tuple(criteria)
        self.stopped = np.zeros(batch, bool)  # [B]: the rows a criterion ended
        self._pending: np.ndarray | None = None  # the last picked tokens [B], not yet in `ids`

    @property
    def idle(self) -> bool:
        """Only criteria: nothing to do to the logits (the sampler's chain then makes no copy of them)."""
        return not self.processors

    def input_ids(self) -> np.ndarray:
        """`[B, T + n]`: the prompts and the n tokens picked so far (a view)."""
        if self._pending is not None:
            self.ids[:, self.length] = self._pending
            self.length += 1
            self._pending = None
        return self.ids[:, : self.length]

    def __call__(self, scores: np.ndarray) -> None:
        ids = self.input_ids()
        for process in self.processors:
            out = process(ids, scores)
            if out is None or out is scores:
                continue
            out = np.asarray(out)
            if out.shape != scores.shape:
                raise ValueError(f"the logits processor {_name(process)} returned scores of shape {out.shape}, not {scores.shape} ([batch, vocabulary])")
            np.copyto(scores, out, casting="same_kind")

    def picked(self, tokens: np.ndarray) -> None:
        self.input_ids()  # (the previous step's, where nothing read them)
        self._pending = tokens

    def reorder(self, rows: np.ndarray) -> None:
        ids = self.input_ids()
        ids[:] = ids[rows]

    def stop_rows(self, logits: np.ndarray) -> np.ndarray | None:
        """After a step (its pad ids in place): the rows the criteria end, `[B]` bool, or None where none does."""
        if not self.criteria:
            return None
        ended = self._ended(self.input_ids(), logits)
        if not ended.any():
            return None
        self.stopped |= ended
        return ended

    def stop_candidates(self, new_tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Beam search: which candidates the criteria end, `[P, keep]` bool. `new_tokens [P, keep, n]`: each prompt's
        candidates' tokens (the step's last); `logits [P * keep, V]`: those of the hypotheses they continue."""
        prompts, keep, count = new_tokens.shape
        beams = self.ids.shape[0] // prompts  # (the rows of a prompt, its beams, share its prompt)
        ids = np.concatenate([np.repeat(self.ids[::beams, : self.width], keep, axis=0), new_tokens.reshape(prompts * keep, count)], axis=1)
        return self._ended(ids, logits).reshape(prompts, keep)

    def _ended(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """`[B]` bool: the rows of `ids [B, T + n]` that some criterion ends."""
        batch = ids.shape[0]
        ended = np.zeros(batch, bool)
        for criterion in self.criteria:
            verdict = np.asarray(criterion(ids, logits))
            if verdict.shape not in ((), (batch,)) or verdict.dtype.kind not in "bi":
                raise ValueError(
                    f"the stopping criterion {_name(criterion)} returned {verdict.dtype} of shape {verdict.shape}: it must return a bool, or one bool a row ([{batch}])"
                )
            ended |= verdict.astype(bool)
        return ended


class PrefixConstrained:
    """transformers' `PrefixConstrainedLogitsProcessor`: each row may take only the tokens `allowed(prompt_index, ids)`
    gives for its ids so far (read from `hooks`, which follows the rows); where none of them is possible in any row of a
    prompt (every one already at -inf), they are forced with a score of 0, as transformers does. `rows_per_prompt`:
    each prompt's answers or beams."""

    def __init__(self, hooks: CallerHooks, allowed: Callable[[int, np.ndarray], Any], rows_per_prompt: int):
        self.hooks, self.allowed, self.rows_per_prompt = hooks, allowed, rows_per_prompt
        self.mask: np.ndarray | None = None  # [B, V]: 0 where the row may go, else -inf (reused step after step)

    def __call__(self, scores: np.ndarray) -> None:
        ids = self.hooks.input_ids()
        if self.mask is None or self.mask.shape != scores.shape:
            self.mask = np.empty_like(scores)
        mask = self.mask
        mask.fill(-np.inf)
        for row in range(len(scores)):
            tokens = self.allowed(row // self.rows_per_prompt, ids[row])
            if len(tokens) == 0:
                raise ValueError(
                    f"prefix_allowed_tokens_fn returned no token for prompt {row // self.rows_per_prompt}: the constraint cannot be met"
                )
            mask[row, np.asarray(tokens, dtype=np.int64)] = 0
        np.add(scores, mask, out=scores)
        stuck = np.isneginf(scores.max(axis=-1)).reshape(-1, self.rows_per_prompt).all(axis=-1)  # [prompts]
        if stuck.any():
            rows = np.repeat(stuck, self.rows_per_prompt)
            scores[rows] = mask[rows]

    def picked(self, tokens: np.ndarray) -> None:  # (the hooks hold the ids)
        pass

    def reorder(self, rows: np.ndarray) -> None:
        pass


def check_callables(name: str, given: Any) -> tuple[Callable, ...]:
    """`logits_processor` or `stopping_criteria` as given (one callable, or a sequence of them; None or empty: none)
    -> a tuple; a TypeError for what cannot be called, and for transformers' own processors and criteria, which work
    on torch tensors."""
    if given is None:
        return ()
    items = (given,) if callable(given) and not isinstance(given, (list, tuple)) else given
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name} must be a callable or a list of them, got {type(given).__name__}") from None
    for item in items:
        if not callable(item):
            raise TypeError(f"{name} must hold callables (input_ids, scores), got {type(item).__name__}")
        if type(item).__module__.startswith("transformers."):
            raise TypeError(
                f"{name}: transformers' {type(item).__name__} works on torch tensors, and ortllava calls with numpy arrays; "
                "give a callable over numpy arrays (transformers' own processors and criteria have generation arguments here: "
                "repetition_penalty, max_time, stop, ...)"
            )
    return items


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
