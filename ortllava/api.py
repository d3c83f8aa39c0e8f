"""The public API: `load` a bundle into a `Pipeline`, then `generate`, `stream` or `chat`."""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from .bundle.manifest import GENERATION_CONFIG_FILE, Manifest, read_bundle_file, read_json_object, read_manifest
from .bundle.sessions import BundleSessions
from .decoders import ContextLengthError, KVCache
from .embedding.features import ProjectedImages
from .embedding.prompt_embedder import PromptEmbedder
from .generation.caller_hooks import CallerCriterion, CallerProcessor
from .generation.decoding import Decoding, decoding_for
from .generation.detokenizer import held_token_ids
from .generation.generate import GenerationMetrics, GenerationResult, positions_needed
from .generation.guidance import GuidanceModel
from .generation.runs import KeepCache, Prefill, Run, StreamChunk, collect, collect_beams, one_answer, stream_chunks
from .generation.settings import GenerationSettings, shown_settings, unsupported_generation_settings
from .prefix import PrefixSlot, pixel_digest, plan_from_held
from .preprocess.image_source import IMAGE_SOURCES, ImageLike
from .preprocess.inputs import given_model_inputs, is_batch, left_aligned, prepare_inputs
from .preprocess.processor import Processor
from .preprocess.tokenizer import BatchFeature
from .warn import GenerationWarning, warn

if TYPE_CHECKING:
    from .chat import ChatSession

Messages = list[dict[str, Any]]
# A prefill plan: (processor outputs, max_new_tokens, metrics) -> what to prefill, and who keeps the cache after
# (None: it goes back to the decoder). `Pipeline._fresh_prefill` embeds the whole prompt; a chat embeds only
# what its cache does not hold yet.
PrefillPlan = Callable[[dict[str, np.ndarray], int, GenerationMetrics], tuple[Prefill, KeepCache | None]]


@dataclass
class Request:
    """A generation's inputs and settings, checked (`Pipeline._check_request`): processor outputs (`input_ids [B, T]`,
    left-padded), whether they were a batch, the settings for their prompt, EOS and pad ids, the metrics begun
    (`preprocess_s` counted) and its decoding."""

    inputs: Mapping[str, np.ndarray]
    batched: bool
    settings: GenerationSettings
    eos: list[int]
    pad_id: int
    metrics: GenerationMetrics
    decoding: Decoding


class Pipeline:
    """A loaded bundle: its processor, its three onnxruntime sessions, and the embedding table."""

    def __init__(
        self, bundle: str | Path, provider: str = "auto", verify: bool = True, io_binding: bool | None = None,
        threads: int | None = None, max_length: int | None = None, cuda_graph: bool = False, prepack: bool = True,
        prefix_cache: bool = False, image_sources: Sequence[str] = IMAGE_SOURCES,
    ):
        """`provider`: "auto" (CUDA when present and the bundle runs there, else the CPU), "cpu", "cuda" or "cuda:N"
        (GPU N; "cuda" is GPU 0). `verify`
        checks every file's sha256.
        `io_binding` keeps keys/values on the device between steps (default: on with CUDA and for "gqa"
        decoders). `max_length` preallocates a "gqa" decoder's key/value buffers to that many positions once,
        so every generation has the same shapes (otherwise they grow as needed and are reused). `cuda_graph`
        captures the decode step in a CUDA graph and replays it (CUDA and "gqa" only; falls back with a warning); its
        buffers are `max_length` long, 8192 positions by default. `prepack` (CPU): onnxruntime repacks the float
        weights of MatMuls into the process's memory as it loads a graph, for its fastest prompt kernels;
        `prepack=False` leaves them where they are, memory-mapped from the bundle's data files: loading is nearly
        instant and uses little memory of its own (the weights stay in the page cache, shared between processes),
        while short prompts run ~2x slower (docs/measurements.md). 4-bit decoders are always repacked. An fp16
        graph on the CPU then also keeps its weights fp16, cast to fp32 as each node reads them, every run.
        `prefix_cache`: keep the keys/values of the last one-prompt generation, and start the next one from the
        longest prefix it shares with it (the same images, by their pixels: a second question about an image skips
        the image's encoding and prefill); see `ortllava.prefix`. Off by default: where each run begins changes
        float rounding (the tokens were identical in every test), and it keeps one cache's memory.
        `image_sources`: the kinds of image a string in a prompt's images or a chat's messages may name: "file" (a
        path or file:// URL), "http" (an http(s) URL), "data" (a data: URI or base64). All by default, as
        transformers; a server that takes chats from untrusted clients keeps only ("data",), so that no client
        makes it read its files or fetch from the network (PIL images and arrays are always taken).
        """
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be True or False, got {verify!r}")
        self.bundle = Path(bundle)
        self.manifest: Manifest = read_manifest(self.bundle, verify=verify)
        self.processor = Processor.from_bundle(self.bundle, self.manifest)
        self.processor.image_sources = image_sources
        self._held_tokens = held_token_ids(self.processor.tokenizer.backend_tokenizer)  # (streamed text waits after them: detokenizer.py)
        self.sessions = BundleSessions(self.bundle, self.manifest, provider, io_binding, threads, max_length, cuda_graph, prepack)
        self.prefix = PrefixSlot(self.sessions.decoder) if prefix_cache else None
        if prefix_cache and self.sessions.decoder.kv_dtype == np.int8:
            warn(
                "this bundle's key/value cache is int8: with prefix_cache, an answer can differ from the same prompt's "
                "without it (where each run begins changes which positions are rounded; see ortllava.prefix)",
            )
        self.embedder = PromptEmbedder(self.bundle, self.manifest, self.processor, self.sessions)
        has_config = (self.bundle / GENERATION_CONFIG_FILE).is_file()
        self.generation_config: dict[str, Any] = read_bundle_file(self.bundle, GENERATION_CONFIG_FILE, read_json_object) if has_config else {}
        ignored = unsupported_generation_settings(self.generation_config)
        if ignored:
            warn(
                f"the bundle's {GENERATION_CONFIG_FILE} sets {shown_settings(ignored)}, which "
                "ortllava does not implement (or takes only as an argument): its answers can differ from those of transformers, "
                "which applies them",
            )

    @property
    def provider(self) -> str:
        return self.sessions.provider

    # ----------------------------------------------------------------------------------------------
    # Inputs

    def encode_images(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
        """`pixel_values [n_images, max_tiles, 3, S, S]` -> packed features `[n_features, D]`, all tiles in one run
        (transformers' `get_image_features`, concatenated)."""
        return self.project_images(pixel_values, image_sizes).pack()

    def project_images(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> ProjectedImages:
        """`pixel_values [n_images, max_tiles, 3, S, S]` -> every tile's projected features `[n_tiles, p*p, D]`
        (all tiles in one run) with what packing them takes: `embed` packs them straight into the embeddings."""
        return self.embedder.project_images(pixel_values, image_sizes)

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | ProjectedImages | None = None) -> np.ndarray:
        """`input_ids [B, T]` -> `inputs_embeds [B, T, D]` in the decoder's dtype, images spliced in (packed
        features `[n_features, D]`, or `project_images`' output, packed as they are written)."""
        return self.embedder.embed(input_ids, image_features)

    @property
    def embed_table(self) -> np.ndarray:
        """`[V, D]`: the token embeddings (memory-mapped from the bundle)."""
        return self.embedder.embed_table

    @property
    def image_newline(self) -> np.ndarray:
        """`[D]`: the feature that closes each row of an image's packed grid."""
        return self.embedder.image_newline

    def prepare(
        self,
        prompt: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | ImageLike | None = None,
        messages: Messages | Sequence[Messages] | None = None,
        pixel_values: bool = True,
    ) -> tuple[dict[str, np.ndarray], bool]:
        """Prompt text or chat messages (+ images) -> processor outputs, and whether the input was a batch
        (`pixel_values=False`: `image_sizes` without the pixels; see `ortllava.preprocess.inputs.prepare_inputs`)."""
        return prepare_inputs(self.processor, prompt, images, messages, pixel_values)

    # ----------------------------------------------------------------------------------------------
    # Generation

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | ImageLike | None = None,
        messages: Messages | Sequence[Messages] | None = None,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        typical_p: float | None = None,
        epsilon_cutoff: float | None = None,
        eta_cutoff: float | None = None,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        min_length: int | None = None,
        repetition_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        encoder_repetition_penalty: float | None = None,
        encoder_no_repeat_ngram_size: int | None = None,
        bad_words_ids: Sequence[Sequence[int]] | None = None,
        sequence_bias: Sequence[tuple[Sequence[int], float]] | dict[tuple[int, ...], float] | None = None,
        suppress_tokens: Sequence[int] | None = None,
        begin_suppress_tokens: Sequence[int] | None = None,
        forced_eos_token_id: int | Sequence[int] | None = None,
        stop: Sequence[str] | str | None = None,
        max_time: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        num_return_sequences: int | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        early_stopping: bool | str | None = None,
        output_logits: bool | None = None,
        streamer: Any = None,
        prefix_allowed_tokens_fn: Callable[[int, np.ndarray], Sequence[int]] | None = None,
        logits_processor: CallerProcessor | Sequence[CallerProcessor] | None = None,
        stopping_criteria: CallerCriterion | Sequence[CallerCriterion] | None = None,
        input_ids: ArrayLike | None = None,
        attention_mask: ArrayLike | None = None,
        pixel_values: ArrayLike | None = None,
        image_sizes: ArrayLike | None = None,
        mm_token_type_ids: ArrayLike | None = None,
        **others: Any,
    ) -> GenerationResult | list[GenerationResult] | list[list[GenerationResult]]:
        """Answers a prompt (`str`, or a `list[str]` batch) or a chat (`messages`, or a list of chats); or, as
        transformers' `model.generate(**inputs)`, a processor's outputs: `input_ids [B, T]` (+ `attention_mask`,
        and `pixel_values`, `image_sizes` where the ids hold image tokens, and `mm_token_type_ids` where the processor
        gave them; see `Processor.check_model_inputs`),
        which are always a batch (a list of results, one per row, as transformers' output has one row per input
        row; `token_ids` are the new tokens only).

        Unset sampling arguments come from the bundle's generation config, then transformers' defaults.
        `max_length`, as transformers': the prompt's tokens (the padded batch's, images included) plus the new ones;
        `max_new_tokens` wins where both are given. `min_new_tokens` forbids the EOS tokens until that many tokens are out
        (`min_length`: until prompt and answer hold that many; as in transformers, a `min_new_tokens` set anywhere, even
        to 0, replaces it). Sampling's warpers, as transformers': `temperature`,
        `top_k`, `top_p`, `min_p` (drops tokens less probable than `min_p` times the most probable one), `typical_p`,
        `epsilon_cutoff`, `eta_cutoff`. `no_repeat_ngram_size=n` forbids a token that would repeat an n-gram of the prompt
        (its ids as given) or the answer. transformers' "encoder" arguments act on the prompt, as transformers applies
        them to a decoder-only model: `encoder_repetition_penalty` > 1 favours the prompt's tokens (< 1 disfavours them),
        and `encoder_no_repeat_ngram_size=n` forbids repeating an n-gram of the prompt. `bad_words_ids` (token-id lists)
        are never completed, and `sequence_bias` (`[[ids, bias], ...]`) adds each bias where its sequence would be
        completed (the prompt counts for both);
        `suppress_tokens` are never picked, `begin_suppress_tokens` not as the first new token, and `forced_eos_token_id`
        ends an answer that reaches `max_new_tokens` (its last token is that one). `stop` strings end a row's
        answer where one appears (the text is cut before it; finish_reason "stop"); transformers' `stop_strings` (with
        its `tokenizer`, taken and left) end it with the token that completes one, which the text keeps. `max_time` (seconds, counted once the
        inputs are preprocessed, as transformers' generate counts them) ends the answers with the token of the step
        that crosses it (finish_reason "length", as at max_new_tokens). `eos_token_id` (one id or
        several) replaces the bundle's EOS ids; `pad_token_id` is fed to batch rows that have ended.
        `num_return_sequences` (with `do_sample=True`): that many answers per prompt, each sampled on its own (the
        images are encoded and the prompt prefilled once; its keys/values are copied for each answer).
        `num_beams=n` > 1: beam search, as transformers' (`length_penalty`, `early_stopping`; with `do_sample=True`, beam
        sampling: the warpers apply and the hypotheses' continuations are drawn; see `ortllava.generation.beam_search`), its best
        `num_return_sequences` (at most n) answers per prompt; not with stop strings or output_logits, and not in a
        stream or a chat.
        `output_logits=True`: each result's `logits [len(token_ids), V]` are the raw logits (before the logits processors
        and the warpers above) each new token was picked from, as transformers' `output_logits`.
        `logits_processor` and `stopping_criteria`: the caller's own, as transformers calls them but over numpy arrays
        (`fn(input_ids [B, T + n], scores [B, V]) -> scores`, applied after the processors above and before the warpers;
        `fn(input_ids, logits) -> bool or [B] bool` after each new token, a row marked True ending there with
        finish_reason "stop"; see `ortllava.generation.caller_hooks`). A criterion that reads a `threading.Event` cancels the
        generation from another thread (under beam search, a criterion ends the candidates it marks, as transformers').
        `prefix_allowed_tokens_fn(prompt_index, ids [T + n]) -> token ids`: the tokens each row may take next, as
        transformers' (constrained generation).
        `streamer` (transformers' `TextStreamer` or `TextIteratorStreamer` over `pipe.processor.tokenizer`, or any object
        with `put` and `end`): given the prompts' ids `[B, T]`, then each step's tokens `[B]`, then `end()`, as transformers
        gives them (not with beam search; `stream()` gives text pieces itself).
        `generation_config=` (a transformers `GenerationConfig`, or a dict of its fields): its set fields as arguments,
        under those given by name, over the bundle's generation config (as transformers 5 reads it).
        Returns a `GenerationResult`, or a list of them for a batch; with `num_return_sequences=n` > 1, a list
        of n for one prompt and a list of such lists for a batch (as transformers' pipelines group them).
        """
        settings = self.settings(
            max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens, min_length=min_length, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, bad_words_ids=bad_words_ids, sequence_bias=sequence_bias,
            encoder_repetition_penalty=encoder_repetition_penalty, encoder_no_repeat_ngram_size=encoder_no_repeat_ngram_size,
            suppress_tokens=suppress_tokens, begin_suppress_tokens=begin_suppress_tokens, forced_eos_token_id=forced_eos_token_id, seed=seed, stop=stop, max_time=max_time,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_return_sequences=num_return_sequences, num_beams=num_beams,
            length_penalty=length_penalty, early_stopping=early_stopping, output_logits=output_logits, streamer=streamer,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, **others,  # (any other name is a TypeError listing the known ones)
        )
        if settings.not_for_beams:  # (a caller's num_beams is refused in `settings`)
            raise ValueError(
                f"the bundle's generation config sets num_beams={settings.num_beams} (beam search), which does not take "
                f"{settings.not_for_beams}: pass num_beams=1"
            )
        model_inputs = given_model_inputs(self.processor, prompt, images, messages, input_ids, attention_mask, pixel_values, image_sizes, mm_token_type_ids)
        run = self._start(None, self._check_request(settings, prompt, images, messages, model_inputs=model_inputs))
        results = collect_beams(run) if settings.num_beams > 1 else collect(run)
        n = settings.num_return_sequences
        if n > 1:
            grouped = [results[start : start + n] for start in range(0, len(results), n)]
            return grouped if run.batched else grouped[0]
        return results if run.batched else results[0]

    def stream(
        self,
        prompt: str | None = None,
        images: Sequence[ImageLike] | ImageLike | None = None,
        messages: Messages | None = None,
        *,
        input_ids: ArrayLike | None = None,
        attention_mask: ArrayLike | None = None,
        pixel_values: ArrayLike | None = None,
        image_sizes: ArrayLike | None = None,
        mm_token_type_ids: ArrayLike | None = None,
        **kwargs: Any,
    ) -> Iterator[StreamChunk]:
        """`generate` for one prompt, chat or row of `input_ids`, yielding text pieces as tokens arrive.

        The pieces joined equal `generate(...).text` for the same arguments; the last chunk carries the
        finish reason and the metrics. The arguments and inputs are checked here (images loaded and preprocessed,
        the prompt's length checked: a caller's mistake is raised by this call); the graphs run from the first chunk.
        The timings (and `max_time`) leave out a wait between this call and the first chunk.
        """
        model_inputs = given_model_inputs(self.processor, prompt, images, messages, input_ids, attention_mask, pixel_values, image_sizes, mm_token_type_ids)
        batch = model_inputs["input_ids"].shape[0] > 1 if model_inputs is not None else is_batch(prompt, messages)
        if batch:
            raise ValueError("stream takes one prompt, one chat or one row of input_ids; use generate for batches")
        settings = one_answer(self.settings(**kwargs), streamed=True)
        request = self._check_request(settings, prompt, images, messages, model_inputs=model_inputs)

        def chunks() -> Iterator[StreamChunk]:
            yield from stream_chunks(self._start(None, request))

        return chunks()

    def chat(self, system: str | None = None, **defaults: Any) -> ChatSession:
        """A multi-turn chat that keeps its keys/values between turns (see `ortllava.chat.ChatSession`).

        `system`: an optional system message. `defaults`: generation arguments for every turn (as `generate`'s:
        max_new_tokens or max_length (a turn that gives either replaces both), do_sample, temperature, top_k, top_p, min_p, typical_p,
        epsilon_cutoff, eta_cutoff, seed, min_new_tokens, min_length, repetition_penalty, no_repeat_ngram_size, encoder_repetition_penalty,
        encoder_no_repeat_ngram_size, bad_words_ids, sequence_bias, suppress_tokens, begin_suppress_tokens, forced_eos_token_id, stop,
        max_time, eos_token_id, pad_token_id, logits_processor, stopping_criteria, prefix_allowed_tokens_fn, streamer (for `send`),
        generation_config).
        """
        from .chat import ChatSession

        return ChatSession(self, system, **defaults)

    def settings(self, **given: Any) -> GenerationSettings:
        """`generate`'s arguments, each given (None: unset), else from the bundle's generation config, else the
        default; an unknown name is a TypeError."""
        return GenerationSettings.resolve(given, self.generation_config, self.sessions.decoder.max_length)

    # ----------------------------------------------------------------------------------------------
    # The shared machinery of generate, stream and chats

    def _check_request(
        self,
        settings: GenerationSettings,
        prompt: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | ImageLike | None = None,
        messages: Messages | Sequence[Messages] | None = None,
        pixel_values: bool = True,
        model_inputs: BatchFeature | None = None,
    ) -> Request:
        """A generation's inputs (`model_inputs` if given, else from the prompt or chat, its images loaded and
        preprocessed) and settings for its prompt, checked: what a caller gets wrong is raised here, before any graph
        runs (a stream calls this at once, and the rest at its first chunk). `pixel_values=False` leaves the images'
        pixels to the prefill plan (a chat turn preprocesses only the images it encodes)."""
        started = time.perf_counter()
        metrics = GenerationMetrics()
        inputs, batched = (model_inputs, True) if model_inputs is not None else self.prepare(prompt, images, messages, pixel_values)
        inputs = left_aligned(self.processor, inputs)
        prompt_tokens = int(inputs["input_ids"].shape[1])

        max_length = settings.max_length
        # max_length, where in force -> max_new_tokens; the default length, held to the room the prompt leaves
        default_new_tokens = settings.max_new_tokens
        settings = settings.for_prompt(prompt_tokens, self.sessions.decoder.max_length)
        self._check_length(inputs["input_ids"], settings.max_new_tokens, max_length, settings.length_is_default)
        least = max(settings.min_new_tokens, settings.min_length - prompt_tokens)
        if least > settings.max_new_tokens:  # (transformers' warning, for max_new_tokens)
            warn(
                f"Unfeasible length constraints: at least {least} new tokens asked for (min_new_tokens, or min_length less the "
                f"prompt's {prompt_tokens} tokens), but at most {settings.max_new_tokens}: the answer stops at {settings.max_new_tokens}",
                GenerationWarning,
            )
        if settings.length_is_default and settings.max_new_tokens < default_new_tokens:
            warn(
                f"the prompt ({prompt_tokens} tokens) leaves room for {settings.max_new_tokens} new tokens of the default "
                f"{default_new_tokens}: the answer may be cut there (a max_new_tokens you give is refused where it does not fit)",
                GenerationWarning,
            )
        eos, pad_id = self._special_ids(settings)
        guidance = GuidanceModel(self.sessions.decoder, self.embed_table) if settings.guidance_scale != 1 else None
        decoding = decoding_for(settings, inputs["input_ids"], inputs["attention_mask"], eos, self.manifest.text.vocab_size, guidance)
        metrics.preprocess_s = time.perf_counter() - started
        metrics.prompt_tokens = prompt_tokens
        return Request(inputs, batched, settings, eos, pad_id, metrics, decoding)

    def _start(self, plan: PrefillPlan | None, request: Request) -> Run:
        """Everything up to the first decoder call, from a checked request: images and embeddings (through `plan`; by
        default `_prefix_prefill` for one prompt with `prefix_cache`, else `_fresh_prefill`). A chat turn's `plan`
        adds the time it preprocesses images to `metrics.preprocess_s`. (Nothing here may refuse the caller's
        arguments: a plan may have taken a held cache, which an error would lose.)"""
        inputs, settings, metrics = request.inputs, request.settings, request.metrics
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        # The clocks: the timings count the preprocessing and what follows from here, not a wait in between (a stream
        # checked when called, read later); max_time counts from here, as transformers' from its generate's start,
        # which gets inputs already preprocessed.
        begun = time.perf_counter()
        started = begun - metrics.preprocess_s
        deadline = begun + settings.max_time if settings.max_time is not None else math.inf

        copies = settings.rows_per_prompt
        vision_start, preprocessed = time.perf_counter(), metrics.preprocess_s
        if plan is None and self.prefix is not None and copies == 1 and input_ids.shape[0] == 1 and attention_mask.all():
            prefill, keep_cache = self._prefix_prefill(inputs, settings.max_new_tokens, metrics)
        elif plan is None:
            prefill, keep_cache = self._fresh_prefill(inputs, settings.max_new_tokens, metrics, copies)
        else:  # (a chat turn: one answer, see runs.one_answer)
            prefill, keep_cache = plan(inputs, settings.max_new_tokens, metrics)
        metrics.vision_s = time.perf_counter() - vision_start - (metrics.preprocess_s - preprocessed)
        decoding = request.decoding
        return Run(
            self.sessions.decoder, self.embed_table, self._answer_text, prefill, len(decoding.prompt_ids), decoding.sample, settings,
            request.eos, request.pad_id, metrics, started, request.batched, keep_cache, processors=decoding.processors,
            held_tokens=self._held_tokens, prompt_tokens=decoding.prompt_mask.sum(axis=1).tolist(), deadline=deadline,
            hooks=decoding.hooks, prompt_ids=decoding.prompt_ids,
        )

    def _fresh_prefill(self, inputs: dict[str, np.ndarray], max_new_tokens: int, metrics: GenerationMetrics, copies: int = 1) -> tuple[Prefill, None]:
        """The whole prompt: every image through the vision path, every token embedded, a new cache. `copies`: each
        prompt's keys/values repeated that many times after its prefill (`num_return_sequences`: the images and the
        prompt run once)."""
        attention_mask = inputs["attention_mask"]
        if "pixel_values" in inputs and self.sessions.splice is not None and attention_mask.all():
            inputs_embeds = self.embedder.on_device(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        else:
            features = self.project_images(inputs["pixel_values"], inputs["image_sizes"]) if "pixel_values" in inputs else None
            inputs_embeds = self.embed(inputs["input_ids"], features)
        capacity = positions_needed(attention_mask.shape[1], max_new_tokens)
        metrics.prefilled_tokens = int(attention_mask.shape[1])
        decoder = self.sessions.decoder

        def prefill() -> tuple[np.ndarray, KVCache]:
            logits, cache = decoder.start(inputs_embeds, attention_mask, capacity)
            if copies == 1:
                return logits, cache
            return np.repeat(logits, copies, axis=0), decoder.repeat_rows(cache, copies)

        return prefill, None

    def _prefix_prefill(self, inputs: dict[str, np.ndarray], max_new_tokens: int, metrics: GenerationMetrics) -> tuple[Prefill, KeepCache]:
        """One prompt from the kept cache (`prefix_cache`): what it holds of the prompt is kept, the rest runs (its
        images only through the vision path), and this generation's cache is kept in its place. Images are the same
        when their preprocessed pixels are (a digest of them)."""
        begun = time.perf_counter()
        keys = []
        if "pixel_values" in inputs:
            sizes = inputs["image_sizes"]
            keys = [pixel_digest(pixels[:count], size) for pixels, count, size in zip(inputs["pixel_values"], self.processor.tile_counts(sizes), sizes)]
        metrics.preprocess_s += time.perf_counter() - begun

        def encode_from(first: int) -> ProjectedImages:
            return self.project_images(inputs["pixel_values"][first:], inputs["image_sizes"][first:])

        return plan_from_held(self, inputs, self.prefix.take(), keys, operator.eq, encode_from, max_new_tokens, metrics, self.prefix.put)

    def _answer_text(self, ids: Sequence[int]) -> str:
        """An answer's text: special tokens dropped, as transformers' pipelines and `batch_decode(..., True)` give it."""
        return self.processor.decode(ids, skip_special_tokens=True)

    def _special_ids(self, settings: GenerationSettings) -> tuple[list[int], int]:
        """(EOS ids, pad id) as transformers' `generate` picks them: the arguments (which default to the bundle's
        generation config), else the tokenizer's EOS ids, and the first EOS id as the pad."""
        eos = settings.eos_token_id if settings.eos_token_id is not None else self.manifest.tokens.eos_token_ids
        eos = [int(eos)] if isinstance(eos, (int, np.integer)) else [int(i) for i in eos or []]
        pad = settings.pad_token_id
        pad = int(pad) if pad is not None else eos[0] if eos else self.manifest.tokens.pad_token_id or 0
        vocab = self.manifest.text.vocab_size
        for name, ids in (("eos_token_id", eos), ("pad_token_id", [pad])):
            outside = [i for i in ids if i >= vocab]
            if outside:
                raise ValueError(f"{name} {outside[0]} is not in the model's vocabulary of {vocab}")
        return eos, pad

    def _check_length(self, input_ids: np.ndarray, max_new_tokens: int, max_length: int | None = None, default_length: bool = False) -> None:
        """A ContextLengthError where the prompt (`input_ids [B, T]`) and its answer need more positions than the decoder
        serves (`max_length`: the generation's, where it set `max_new_tokens`, named in the message instead;
        `default_length`: no one set the length, so only the prompt can be at fault)."""
        decoder = self.sessions.decoder
        limit = decoder.max_length  # the model's positions, fewer where the graph serves fewer, or the fixed buffers'
        prompt_tokens = int(input_ids.shape[1])
        needed = positions_needed(prompt_tokens, max_new_tokens)
        if needed > limit:
            images = bool((input_ids == self.processor.image_token_id).any())  # (the advice names images only where there are some)
            what = f"the key/value buffers fixed at load by max_length={limit}" if decoder.fixed_capacity else f"the model's {limit}"
            asked = f"max_length is {max_length} ({max_new_tokens} new tokens)" if max_length is not None else f"max_new_tokens is {max_new_tokens}"
            counted, fewer = (" (images included)", ", or use smaller or fewer images") if images else ("", "")
            if default_length:
                raise ContextLengthError(
                    f"the prompt is {prompt_tokens} tokens{counted}, beyond {what}: no room is left for an answer; shorten the prompt{fewer}"
                )
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens{counted} and {asked}: {needed} positions (the last new token takes none), "
                f"beyond {what}; shorten the prompt{fewer}, or lower {'max_length' if max_length is not None else 'max_new_tokens'}"
            )


def load(bundle: str | Path, provider: str = "auto", **kwargs: Any) -> Pipeline:
    """Loads an exported bundle. `provider`: "auto" (CUDA when present and the bundle runs there), "cpu", "cuda" or
    "cuda:N" (GPU N); the other options are `Pipeline`'s."""
    if "device" in kwargs:  # (transformers' and ortllava.pipeline's name for it)
        raise TypeError(f"load() takes provider=... ('auto', 'cpu', 'cuda' or 'cuda:N'), not device={kwargs['device']!r}")
    return Pipeline(bundle, provider=provider, **kwargs)


# `Pipeline`'s options that `generate` below passes to the load of a bundle path (max_length is a generation argument there).
LOAD_OPTIONS = ("provider", "verify", "io_binding", "threads", "cuda_graph", "prepack", "prefix_cache", "image_sources", "device")  # (device: refused by load, with a pointer)


def generate(bundle_or_pipe: str | Path | Pipeline, messages: Messages | Sequence[Messages], **kwargs: Any) -> GenerationResult | list[GenerationResult]:
    """One-call generation from a bundle path (loaded on the fly, with any of `LOAD_OPTIONS` among `kwargs`) or a
    loaded `Pipeline`; the other `kwargs` are `Pipeline.generate`'s."""
    options = {name: kwargs.pop(name) for name in LOAD_OPTIONS if name in kwargs}
    if isinstance(bundle_or_pipe, Pipeline) and options:
        raise TypeError(f"{', '.join(options)}: load options, and this pipeline is loaded already (give them to ortllava.load)")
    pipe = bundle_or_pipe if isinstance(bundle_or_pipe, Pipeline) else load(bundle_or_pipe, **options)
    return pipe.generate(messages=messages, **kwargs)
