"""A prepared generation (`Run`) driven to what the caller gets: every row's `GenerationResult` (`collect`), or one
row's text pieces as they become stable (`stream_chunks`); both end an answer at an EOS token or a stop string.

`Pipeline.generate`, `Pipeline.stream` and chat turns prepare a `Run` (`Pipeline._start`) and hand it here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Iterator, Sequence

import numpy as np

from ..decoders import KVCache
from ..warn import GenerationWarning, warn
from .beam_search import beam_search
from .caller_hooks import CallerHooks
from .detokenizer import StreamingDetokenizer
from .generate import Decoder, GenerationMetrics, GenerationResult, Step, decode_loop
from .logits_processors import LogitsProcessor, close_processors
from .sampling import Sampler
from .settings import GenerationSettings

Prefill = Callable[[], tuple[np.ndarray, KVCache]]  # runs the prompt through the decoder: (logits [B, V], cache)
KeepCache = Callable[[KVCache, list[int]], None]  # (the cache after the answer, row 0's new tokens)


def one_answer(settings: GenerationSettings, streamed: bool = False, logits_from: str = "generate") -> GenerationSettings:
    """`settings`, refused where they ask for what one answer (a stream, a chat turn) cannot give: several answers,
    the caller's beam search (the bundle's generation config's gives way, with a warning), or logits along text
    pieces (`streamed`; `logits_from` names what gives them)."""
    if settings.num_return_sequences != 1:
        raise ValueError("one answer is given here: num_return_sequences must be 1 (use Pipeline.generate for several)")
    if settings.num_beams != 1:
        if settings.beams_are_callers:
            raise ValueError(f"beam search (num_beams={settings.num_beams}) gives its answers at the end: use Pipeline.generate for it, or num_beams=1")
        warn(
            f"the bundle's generation config sets num_beams={settings.num_beams}, but beam search gives its answers at the end: this "
            "answer is searched without beams (num_beams=1 silences this)",
            GenerationWarning,
        )
        settings = replace(settings, num_beams=1, beams_are_callers=False)
    if streamed and settings.output_logits:
        raise ValueError(f"a stream gives text pieces: use {logits_from} for output_logits")
    if streamed and settings.streamer is not None:
        raise ValueError(f"a stream gives its text pieces itself: a streamer is for {logits_from}")
    return settings


@dataclass
class StreamChunk:
    """One piece of a streamed answer; the last chunk has `finish_reason` ("stop" or "length") and `metrics`.

    `token_ids`: the tokens generated since the previous chunk (a piece of text can take several, and a token with
    no text of its own, such as the EOS, waits for the next chunk or the last one), so the chunks' `token_ids` joined
    are the answer's, as `generate` gives them. `token`: the last of them, or None where there are none."""

    text: str
    token: int | None
    finish_reason: str | None = None
    metrics: GenerationMetrics | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass
class Run:
    """A prepared generation (`Pipeline._start`): what `decode_loop` needs, and what the results report."""

    decoder: Decoder
    embed_table: np.ndarray  # [V, D]: each new token's embedding
    answer_text: Callable[[Sequence[int]], str]  # an answer's ids -> its text
    prefill: Prefill
    batch: int
    sampler: Sampler
    settings: GenerationSettings
    eos: list[int]
    pad_id: int
    metrics: GenerationMetrics
    started: float
    batched: bool
    keep_cache: KeepCache | None = None  # given the cache at the end instead of the decoder (a chat, the prefix cache)
    tokens: list[int] = field(default_factory=list)  # row 0's new tokens so far (only runs that keep their cache)
    processors: list[LogitsProcessor] = field(default_factory=list)  # the sampler's, which beam search applies itself
    prompt_tokens: Sequence[int] = ()  # each row's prompt tokens, without padding (for its result)
    deadline: float = math.inf  # max_time's end (perf_counter): the step that crosses it gives the last token
    held_tokens: Collection[int] = ()  # ids after which streamed text waits for the next token (detokenizer.held_token_ids)
    hooks: CallerHooks | None = None  # the caller's logits processors and stopping criteria (also among `processors`)
    prompt_ids: np.ndarray | None = None  # [B, T]: the rows' prompts, as transformers' input_ids (for a streamer's first put)

    def embed_step(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Writes the embeddings of `ids [B]` into `out [B, 1, D]` (the cache's step buffer)."""
        table = self.embed_table
        if table.dtype == out.dtype:  # ("clip": the ids are the sampler's, in range; "raise" would buffer the output)
            table.take(ids, axis=0, out=out[:, 0], mode="clip")
        else:
            out[:, 0] = np.take(table, ids, axis=0)

    def loop(self) -> Iterator[Step]:
        """The decode loop's steps; closing this generator closes the loop (and releases or keeps the cache)."""
        hand_over = self.keep_cache  # a chat or the prefix cache keeps the cache with the token ids it holds
        keep = None if hand_over is None else (lambda cache: hand_over(cache, self.tokens))

        stop_rows = self.hooks.stop_rows if self.hooks is not None and self.hooks.criteria else None
        steps = decode_loop(
            self.decoder, self.prefill, self.embed_step, self.sampler, self.settings.max_new_tokens, self.eos, self.pad_id, self.metrics, self.started,
            keep, stop_rows,
        )
        deadline = self.deadline
        try:
            for step in steps:
                if keep is not None and step.active[0]:  # only a kept cache needs them
                    self.tokens.append(int(step.tokens[0]))
                yield step
                if time.perf_counter() > deadline:  # (as transformers' MaxTimeCriteria: this step's token is the last)
                    break
        finally:
            steps.close()  # (the answer's cache first: released, it becomes the decoder's spare)
            close_processors(self.processors)


def collect(run: Run) -> list[GenerationResult]:
    """Runs a prepared generation to the end: one `GenerationResult` per row."""
    stop, kept = run.settings.stop, run.settings.stop_strings  # (cut before; kept in the answer, transformers' stop_strings)
    batch = run.batch
    answers: list[list[int]] = [[] for _ in range(batch)]
    logits: list[list[np.ndarray]] | None = [[] for _ in range(batch)] if run.settings.output_logits else None
    stopped = [False] * batch
    detokenizers = [StreamingDetokenizer(run.answer_text, run.held_tokens) for _ in range(batch)] if stop else None
    finders = [StopFinder(stop) for _ in range(batch)]
    matchers = [StopStringMatcher(run, row) for row in range(batch)] if kept else None
    streamer = run.settings.streamer
    prompts_put = False
    steps = run.loop()
    try:
        for step in steps:
            if streamer is not None:
                if not prompts_put:  # transformers' first put, the prompts: before the first token's, as there, but
                    # after the prefill, so that a streamer that fails leaves a kept cache (a chat's) to the loop's end
                    streamer.put(run.prompt_ids)
                    prompts_put = True
                streamer.put(step.tokens.copy())  # every row's token, the pad id for rows that have ended (a copy: it may be kept)
            tokens = step.tokens.tolist()
            for row, active in enumerate(step.active.tolist()):
                if not active:
                    continue
                answers[row].append(tokens[row])
                if logits is not None:
                    logits[row].append(step.logits[row].copy())  # (the buffer is the next step's)
                if detokenizers is not None:
                    detokenizers[row].add(tokens[row])
                    stopped[row] = finders[row](detokenizers[row].text, detokenizers[row].tail()) is not None
                if matchers is not None:
                    stopped[row] = matchers[row](tokens[row]) or stopped[row]
                # (a row a stop string ends is fed the pad id from the next step on, as transformers'
                # StopStringCriteria leaves it; the loop ends once every row has ended)
                step.finished[row] |= stopped[row]
    finally:
        steps.close()
        if streamer is not None:  # (also after an error: a consumer waiting on a TextIteratorStreamer is let go)
            streamer.end()
    run.metrics.total_s = time.perf_counter() - run.started
    results = []
    for row, answer in enumerate(answers):
        text = run.answer_text(answer)
        cut = _find_stop(text, stop) if stop else None
        by_criterion = run.hooks is not None and bool(run.hooks.stopped[row])
        reason = "stop" if cut is not None or stopped[row] or by_criterion or (answer and answer[-1] in run.eos) else "length"
        kept = None
        if logits is not None:
            kept, logits[row] = np.stack(logits[row]), []  # (each row's copies go as its array is made)
        results.append(GenerationResult(
            text=text if cut is None else text[:cut], token_ids=answer, finish_reason=reason, metrics=run.metrics, logits=kept,
            prompt_tokens=_row_prompt(run, row),
        ))
    return results


def collect_beams(run: Run) -> list[GenerationResult]:
    """Runs a prepared beam search (`settings.num_beams > 1`; `run.batch` is prompts × beams) to the end: each
    prompt's best `num_return_sequences` answers, best first, one `GenerationResult` each."""
    settings = run.settings
    stop_candidates = run.hooks.stop_candidates if run.hooks is not None and run.hooks.criteria else None
    try:
        answers = beam_search(
            run.decoder, run.prefill, run.embed_step, run.processors, run.batch // settings.num_beams, settings, run.eos, run.pad_id, run.metrics,
            run.started, run.deadline, stop_candidates,
        )
    finally:
        close_processors(run.processors)
    run.metrics.total_s = time.perf_counter() - run.started
    return [
        GenerationResult(
            text=run.answer_text(tokens), token_ids=tokens, finish_reason="stop" if stopped or tokens and tokens[-1] in run.eos else "length",
            metrics=run.metrics, prompt_tokens=_row_prompt(run, index * settings.num_beams),
        )
        for index, (prompt, prompt_stopped) in enumerate(zip(answers.tokens, answers.stopped)) for tokens, stopped in zip(prompt, prompt_stopped)
    ]


def _row_prompt(run: Run, row: int) -> int:
    return int(run.prompt_tokens[row]) if len(run.prompt_tokens) else run.metrics.prompt_tokens


def stream_chunks(run: Run) -> Iterator[StreamChunk]:
    """Runs a prepared one-row generation, yielding stable text pieces; the last chunk has the finish reason
    and the metrics. The decode loop is closed (its cache released or kept) before that last chunk."""
    stop, kept = run.settings.stop, run.settings.stop_strings
    detokenizer = StreamingDetokenizer(run.answer_text, run.held_tokens)
    find_stop, match_kept = StopFinder(stop), StopStringMatcher(run, 0) if kept else None
    released = 0  # characters of detokenizer.text already yielded
    pending: list[int] = []  # tokens since the last chunk
    reason = "length"
    ended = False  # an EOS token or a stop string ended the answer
    steps = run.loop()
    try:
        for step in steps:
            token = int(step.tokens[0])
            detokenizer.add(token)
            pending.append(token)
            if step.finished[0]:
                detokenizer.finalize()
                reason = "stop"
            text = detokenizer.text
            tail = detokenizer.tail() if stop else ""  # (what follows `text` up to the last whole character: it may still change)
            cut = find_stop(text, tail)
            kept_hit = match_kept is not None and match_kept(token) and cut is None
            if cut is not None:
                reason, end, text = "stop", cut, text + tail
            elif kept_hit:  # the answer ends with this token, whose text it keeps (transformers' stop_strings)
                detokenizer.finalize()
                reason, text = "stop", detokenizer.text
                end = len(text)
            else:  # hold back a tail that could still grow into a stop string
                end = len(text) - (_stop_prefix_overlap(text, stop) if stop and not step.finished[0] else 0)
            if end > released:
                chunk, pending = StreamChunk(text[released:end], token, token_ids=pending), []
                yield chunk
                released = end
            if cut is not None or kept_hit or step.finished[0]:
                ended = True
                break
    finally:
        steps.close()
    if not ended:  # max_new_tokens reached
        detokenizer.finalize()
        text = detokenizer.text
        cut = find_stop(text)
        reason = "stop" if cut is not None else reason
        end = cut if cut is not None else len(text)
        if end > released:
            chunk, pending = StreamChunk(text[released:end], pending[-1] if pending else None, token_ids=pending), []
            yield chunk
    run.metrics.total_s = time.perf_counter() - run.started
    yield StreamChunk("", pending[-1] if pending else None, reason, run.metrics, pending)


class StopFinder:
    """Where the first stop string begins in `text + tail`, where `text` only grows (a detokenizer's released text)
    and `tail` may change from call to call (its `tail()`): each call searches only where a match not seen before
    can lie, so a token's search does not grow with the answer. `min_end`: only a match that ends past this many
    characters counts (the text before them is context, not the answer)."""

    def __init__(self, stop: Sequence[str] | None, min_end: int = 0):
        self.stop = [s for s in stop or () if s]
        self.longest = max(map(len, self.stop), default=0)
        self.min_end = min_end
        self._searched = 0  # characters of `text` searched: a new match ends past them

    def __call__(self, text: str, tail: str = "") -> int | None:
        start = max(0, self._searched - self.longest + 1)
        self._searched = len(text)
        window = text[start:] + tail if tail else text
        offset = start if tail else 0
        # (a match of s that begins at min_end - len(s) + 1 or later ends past min_end)
        hits = [index for index in (window.find(s, max(start, self.min_end - len(s) + 1) - offset) for s in self.stop) if index >= 0]
        return offset + min(hits) if hits else None


class StopStringMatcher:
    """transformers' `stop_strings` for one row: whether the answer's newest token completes one. Matched in the text of
    the row's last prompt tokens and its answer decoded together, as transformers' StopStringCriteria reads the whole
    sequence: a string may begin in the prompt, and the answer's first token keeps the leading space that a decode of
    the answer alone drops (SentencePiece's); a match counts where it ends in the answer."""

    def __init__(self, run: Run, row: int):
        strings = run.settings.stop_strings
        context = [int(t) for t in run.prompt_ids[row][-min(max(map(len, strings)), _row_prompt(run, row)) :]] if run.prompt_ids is not None else []
        self.detokenizer = StreamingDetokenizer(run.answer_text, run.held_tokens)
        for token in context:
            self.detokenizer.add(token)
        self.find = StopFinder(strings, min_end=len(run.answer_text(context)))

    def __call__(self, token: int) -> bool:
        self.detokenizer.add(token)
        return self.find(self.detokenizer.text, self.detokenizer.tail()) is not None


def _find_stop(text: str, stop: Sequence[str] | None) -> int | None:
    """Index where the first stop string begins in `text`, or None."""
    hits = [text.find(s) for s in stop or () if s and s in text]
    return min(hits) if hits else None


def _stop_prefix_overlap(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
