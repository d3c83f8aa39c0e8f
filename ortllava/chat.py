"""Multi-turn chat that keeps the decoder's keys/values between turns.

    chat = pipe.chat(system="You are terse.", max_new_tokens=100)
    print(chat.send("What is in this picture?", images=["cat.jpg"]).text)
    for chunk in chat.stream("And what colour is it?"):
        print(chunk.text, end="", flush=True)

Every turn renders the whole conversation with the chat template, exactly as
`Pipeline.generate(messages=chat.messages + [new message])` would, so the answers are those of recomputing
from scratch. But the decoder only runs the tokens its cache does not hold yet: the previous turn's cache is
cut back to the longest prefix it shares with the new prompt and extended by the rest (`ortllava.prefix`; an
image's key is the image object the conversation keeps). Only the images whose tokens are in the new part are
preprocessed and go through the vision encoder; the earlier ones give just their sizes (for their token
counts). A template that renders an earlier answer differently from the tokens generated for it just moves the
cut back. With an int8 key/value cache the answers are not token for token those of recomputing (see
`ortllava.prefix`).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Generator, Iterator, Sequence

import numpy as np

from .decoders import ContextLengthError
from .embedding.features import ProjectedImages
from .generation.generate import GenerationMetrics, GenerationResult, positions_needed
from .generation.runs import collect, one_answer, stream_chunks
from .generation.settings import LENGTH_ARGUMENTS, with_callers_generation_config
from .prefix import HeldCache, plan_from_held
from .preprocess.image_source import ImageLike, load_image
from .preprocess.inputs import flatten_images, images_in_messages

if TYPE_CHECKING:
    from .api import Pipeline, Request
    from .generation.runs import Run, StreamChunk


class ChatSession:
    """One conversation with a `Pipeline`: `send` or `stream` a user message, read `messages`, `reset`.

    `messages` is the history in Hugging Face chat format: an optional system message, then user messages
    (images first as `{"type": "image", "image": ...}`, then `{"type": "text", "text": ...}`) and the assistant's
    answers (`{"type": "text", "text": ...}`). Images are opened once, when sent; the history holds each as an
    RGB PIL image of its own (a copy: later changes to the caller's object do not reach the conversation). A
    session is for one thread at a time.
    """

    def __init__(self, pipe: Pipeline, system: str | None = None, **defaults: Any):
        one_answer(pipe.settings(**defaults))  # a wrong argument fails here, not at the first turn
        if system is not None and not isinstance(system, str):
            raise TypeError(f"system must be a string (the system message's text) or None, got {type(system).__name__}")
        if not pipe.processor.chat_template:
            raise ValueError("this bundle has no chat template: a chat needs one")
        self.pipe = pipe
        self.system = system
        self.defaults = with_callers_generation_config(defaults)
        self.messages: list[dict[str, Any]] = []
        # The keys/values after the last turn (image keys: the kept images), in a box of their own that the finalizer
        # reads: a session collected while it holds a cache hands it back (under CUDA graphs, a kept graph's buffers).
        self._box = _HeldBox()
        weakref.finalize(self, _release_held, self._box, pipe.sessions.decoder).atexit = False
        # The last stream, held weakly: one the caller lets go (`break` out of a for loop over it) is closed at once,
        # and its answer so far joins `messages` then, not at the next turn. (Closing a finished one is a no-op.)
        self._open: weakref.ref[Generator[StreamChunk, None, None]] | None = None
        self._open_thread = 0  # the thread that opened it: only that one closes it to begin a turn
        # Held while a turn runs (a `send`, a stream being read, a `reset`): a second thread's turn is refused, not
        # run over the same history and cache.
        self._busy = threading.Lock()
        self.reset()

    # ----------------------------------------------------------------------------------------------
    # Turns

    def send(self, text: str, images: Sequence[ImageLike] | ImageLike | None = None, **generate_kwargs: Any) -> GenerationResult:
        """Answers `text` (with `images`, placed before it) given the conversation so far; the message and the
        answer join `messages`. `generate_kwargs` override the session's defaults for this turn."""
        self._close_open_stream()
        with self._turn():
            message = self._user_message(text, images)
            run = self._start(*self._request(message, generate_kwargs, streamed=False))
            result = collect(run)[0]
            self._commit(message, result.text)
            return result

    def stream(self, text: str, images: Sequence[ImageLike] | ImageLike | None = None, **generate_kwargs: Any) -> Iterator[StreamChunk]:
        """`send`, yielding text pieces as tokens arrive (the same `StreamChunk`s as `Pipeline.stream`; the
        last one carries the finish reason and the metrics). The pieces joined equal `send(...).text`.

        A stream closed early (`close()`, let go as by `break` out of a for loop, or left unfinished when the next
        turn starts) keeps the text it yielded as the answer; one that fails (an error raised during the turn) adds
        nothing to the history, as with `send`; one never iterated never runs (its message does not join the history
        either). The turn's arguments, images and length are checked by this call (a caller's mistake is raised
        here); the graphs run from the first chunk.
        """
        self._close_open_stream()
        with self._turn():
            message = self._user_message(text, images)
            chunks = self._stream_turn(message, *self._request(message, generate_kwargs, streamed=True))
            # (published before the turn is let go: another thread's send or stream from then on finds it open)
            self._open, self._open_thread = weakref.ref(chunks), threading.get_ident()
        return chunks

    def reset(self) -> None:
        """Forgets the conversation (the system message stays) and hands the cache back to the decoder."""
        self._close_open_stream()
        with self._turn():
            self.messages = [] if self.system is None else [{"role": "system", "content": [{"type": "text", "text": self.system}]}]
            if self._held is not None:
                self.pipe.sessions.decoder.release(self._held.cache)
                self._held = None

    @property
    def _held(self) -> HeldCache | None:
        return self._box.held

    @_held.setter
    def _held(self, held: HeldCache | None) -> None:
        self._box.held = held

    @property
    def cached_tokens(self) -> int:
        """How many tokens the kept cache holds (0 before the first turn and after `reset`)."""
        return 0 if self._held is None else len(self._held.ids)

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _stream_turn(self, message: dict[str, Any], request: Request, messages: list[dict[str, Any]]) -> Generator[StreamChunk, None, None]:
        with self._turn():  # (held from the first chunk to the last, or the close)
            run = self._start(request, messages)
            pieces: list[str] = []
            committed = closed_early = False
            chunks = stream_chunks(run)
            try:
                for chunk in chunks:
                    pieces.append(chunk.text)
                    if chunk.finish_reason is not None:  # the loop is closed and the cache kept by now
                        self._commit(message, "".join(pieces))
                        committed = True
                    yield chunk
            except (GeneratorExit, KeyboardInterrupt):  # closed by the consumer, the next turn or Ctrl-C; an error is not a close
                closed_early = True
                raise
            finally:
                chunks.close()
                if closed_early and not committed and run.tokens:  # what was shown is the answer
                    self._commit(message, "".join(pieces))

    def _close_open_stream(self) -> None:
        """Closes the last stream if it is still open (a finished one closes as a no-op); a RuntimeError where another
        thread opened it and has not finished it (read or not, it is that thread's turn)."""
        stream = self._open() if self._open is not None else None
        if stream is not None and inspect.getgeneratorstate(stream) != inspect.GEN_CLOSED and self._open_thread != threading.get_ident():
            raise RuntimeError(_BUSY)
        self._open = None
        if stream is not None:
            try:
                stream.close()
            except ValueError:  # ("generator already executing": another thread is reading it)
                self._open = weakref.ref(stream)
                raise RuntimeError(_BUSY) from None

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Holds the session for one turn; a RuntimeError where another thread holds it."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(_BUSY)
        try:
            yield
        finally:
            self._busy.release()

    def _user_message(self, text: str, images: Sequence[ImageLike] | ImageLike | None) -> dict[str, Any]:
        if not isinstance(text, str):
            raise TypeError(f"a chat message is a string, got {type(text).__name__}")
        placeholder = self.pipe.processor.image_token
        if placeholder in text:  # (else the mismatch is found over the whole history, and named in its counts)
            raise ValueError(
                f"the message's text holds {placeholder!r}, the image placeholder: give the images with images=[...] "
                "(the chat template places them before the text)"
            )
        images = [] if images is None else flatten_images(images)
        content: list[dict[str, Any]] = [{"type": "image", "image": self._kept_image(image)} for image in images]
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    def _kept_image(self, image: ImageLike) -> Any:
        """The image as the conversation keeps it, opened and converted to RGB once, here, as the turn begins (one
        that cannot be read or converted fails before any graph runs): an image of its own, which the caller's
        later changes to their object (a reused frame buffer, an in-place resize) do not reach, as the cache
        holds its features."""
        kept = self.pipe.processor.image_processor.rgb_image(load_image(image, sources=self.pipe.processor.image_sources))
        return kept.copy() if kept is image else kept

    def _commit(self, message: dict[str, Any], answer: str) -> None:
        self.messages.append(message)
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})

    def _request(self, message: dict[str, Any], generate_kwargs: dict[str, Any], streamed: bool) -> tuple[Request, list[dict[str, Any]]]:
        """The turn's request, checked before any graph runs (`Pipeline._check_request`), and the conversation it
        answers."""
        defaults, generate_kwargs = self.defaults, with_callers_generation_config(generate_kwargs)  # (a turn's config, under its arguments)
        if any(generate_kwargs.get(name) is not None for name in LENGTH_ARGUMENTS):  # a turn's length replaces the session's
            defaults = {name: value for name, value in defaults.items() if name not in LENGTH_ARGUMENTS}
        given = {**defaults, **generate_kwargs}
        settings = one_answer(self.pipe.settings(**given), streamed, logits_from="send()")  # before any graph runs
        messages = [*self.messages, message]
        try:  # pixels are left out: the plan preprocesses only the images whose features the cache lacks
            return self.pipe._check_request(settings, messages=messages, pixel_values=False), messages
        except ContextLengthError as error:
            # Advice only where it helps: there is a history, and without it the message and its answer would fit.
            system, history = self.messages[: self.system is not None], self.messages[self.system is not None :]
            alone_tokens = self.pipe.prepare(messages=[*system, message], pixel_values=False)[0]["input_ids"].shape[1]
            alone = positions_needed(alone_tokens, settings.for_prompt(alone_tokens, self.pipe.sessions.decoder.max_length).max_new_tokens)
            if not history or alone > self.pipe.sessions.decoder.max_length:
                raise
            raise ContextLengthError(f"{error}. This conversation is full: reset() starts a new one (/reset in `ortllava chat`)") from None

    def _start(self, request: Request, messages: list[dict[str, Any]]) -> Run:
        """The turn's run: only what the kept cache lacks is prefilled (`_plan`)."""
        return self.pipe._start(self._plan(messages), request)

    def _plan(self, messages: list[dict[str, Any]]):
        """The prefill plan of one turn (see `api.PrefillPlan`): only the tokens the cache lacks."""
        sources = images_in_messages(messages)

        def plan(inputs: dict[str, np.ndarray], max_new_tokens: int, metrics: GenerationMetrics):
            pipe = self.pipe

            def encode_from(first: int) -> ProjectedImages:
                begun = time.perf_counter()
                new_images = pipe.processor.image_processor([load_image(source, sources=pipe.processor.image_sources) for source in sources[first:]])
                metrics.preprocess_s += time.perf_counter() - begun
                return pipe.project_images(new_images["pixel_values"], new_images["image_sizes"])

            def hold(held: HeldCache) -> None:
                self._held = held

            # Taken out of the session while the turn runs; the turn's cache replaces it at the end, and a turn that
            # fails before its answer begins puts back what it still holds.
            held, self._held = self._held, None
            return plan_from_held(pipe, inputs, held, sources, _same_source, encode_from, max_new_tokens, metrics, hold)

        return plan


_BUSY = (
    "this chat session is answering in another thread: a ChatSession is one conversation, for one thread at a time "
    "(give each thread its own pipe.chat())"
)


class _HeldBox:
    held: HeldCache | None = None


def _release_held(box: _HeldBox, decoder) -> None:
    """A collected `ChatSession`'s finalizer (it holds no reference to the session)."""
    if box.held is not None:
        decoder.release_from_finalizer(box.held.cache)


def _same_source(a: Any, b: Any) -> bool:
    if a is b:
        return True
    return isinstance(a, str) and isinstance(b, str) and a == b
