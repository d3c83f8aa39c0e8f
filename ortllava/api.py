"""The public API: `load` a bundle into a `Pipeline`, then `generate`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .features import embed, pack_images
from .generate import GenerationMetrics, GenerationResult, generate_tokens
from .image import ImageLike, num_tiles
from .manifest import EMBED_TOKENS_FILE, GENERATION_CONFIG_FILE, IMAGE_NEWLINE_FILE, Manifest, read_manifest
from .processor import Processor
from .sampling import make_sampler, with_min_new_tokens
from .sessions import BundleSessions

Messages = list[dict[str, Any]]

# transformers' defaults for what a generation config leaves unset.
_SAMPLING_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
DEFAULT_MAX_NEW_TOKENS = 256


class Pipeline:
    """A loaded bundle: its processor, its three onnxruntime sessions, and the embedding table."""

    def __init__(self, bundle: str | Path, provider: str = "auto", verify: bool = True, io_binding: bool | None = None, threads: int | None = None):
        """`provider`: "auto" (CUDA when present), "cpu" or "cuda". `verify` checks every file's sha256.
        `io_binding` keeps keys/values on the device between steps (default: on with CUDA, off on CPU).
        """
        self.bundle = Path(bundle)
        self.manifest: Manifest = read_manifest(self.bundle, verify=verify)
        self.processor = Processor.from_bundle(self.bundle, self.manifest)
        self.sessions = BundleSessions(self.bundle, self.manifest, provider, io_binding, threads)
        self.embed_table = np.load(self.bundle / EMBED_TOKENS_FILE, mmap_mode="r")  # [V, D]
        self.image_newline = np.load(self.bundle / IMAGE_NEWLINE_FILE)  # [D]
        config_path = self.bundle / GENERATION_CONFIG_FILE
        self.generation_config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}

    @property
    def provider(self) -> str:
        return self.sessions.provider

    # ----------------------------------------------------------------------------------------------
    # Inputs

    def encode_images(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> np.ndarray:
        """`pixel_values [n_images, max_tiles, 3, S, S]` -> packed features `[n_features, D]`, all tiles in one run."""
        vision = self.manifest.vision
        tile = self.processor.image_processor.config.tile_size
        counts = [num_tiles(tuple(size), vision.grid_pinpoints, tile) for size in image_sizes.tolist()]
        tiles = np.concatenate([pixels[:count] for pixels, count in zip(pixel_values, counts)], axis=0)
        projected = self.sessions.vision(tiles)
        return pack_images(projected, image_sizes, counts, self.image_newline, vision.grid_pinpoints, tile)

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | None = None) -> np.ndarray:
        """`input_ids [B, T]` -> `inputs_embeds [B, T, D]` in the decoder's dtype, images spliced in."""
        embeds = embed(input_ids, self.embed_table, self.manifest.tokens.image_token_id, image_features)
        return embeds.astype(self.sessions.decoder.dtype, copy=False)

    def prepare(
        self,
        prompt: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | ImageLike | None = None,
        messages: Messages | Sequence[Messages] | None = None,
    ) -> tuple[dict[str, np.ndarray], bool]:
        """Prompt text or chat messages (+ images) -> processor outputs, and whether the input was a batch."""
        if (prompt is None) == (messages is None):
            raise ValueError("give either prompt=... or messages=..., not both and not neither")
        if messages is not None:
            if images is not None:
                raise ValueError("with messages=..., put the images inside the messages")
            batched = bool(messages) and isinstance(messages[0], (list, tuple))
            if not self.processor.chat_template:
                raise ValueError("this bundle has no chat template: give prompt=... instead of messages=...")
            inputs = self.processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            return inputs, batched
        batched = not isinstance(prompt, str)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        inputs = self.processor(text=prompt, images=images, padding=True, padding_side="left")
        return inputs, batched

    # ----------------------------------------------------------------------------------------------
    # Generation

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | ImageLike | None = None,
        messages: Messages | Sequence[Messages] | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        min_new_tokens: int = 0,
    ) -> GenerationResult | list[GenerationResult]:
        """Answers a prompt (`str`, or a `list[str]` batch) or a chat (`messages`, or a list of chats).

        Unset sampling arguments come from the bundle's generation config, then transformers' defaults.
        `min_new_tokens` forbids the EOS tokens until that many tokens are out.
        Returns a `GenerationResult`, or a list of them for a batch.
        """
        started = time.perf_counter()
        metrics = GenerationMetrics()
        inputs, batched = self.prepare(prompt, images, messages)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        # A chat batch is padded on the tokenizer's side; generation needs every prompt to end at the last column.
        if not (attention_mask[:, -1] == 1).all():
            ids = [row[mask == 1].tolist() for row, mask in zip(input_ids, attention_mask)]
            padded = self.processor.pad(ids, padding=True, padding_side="left")
            input_ids, attention_mask = padded["input_ids"], padded["attention_mask"]

        settings = self._settings(max_new_tokens, do_sample, temperature, top_k, top_p)
        self._check_length(input_ids.shape[1], settings["max_new_tokens"])
        metrics.preprocess_s = time.perf_counter() - started
        metrics.prompt_tokens = int(input_ids.shape[1])

        vision_start = time.perf_counter()
        features = self.encode_images(inputs["pixel_values"], inputs["image_sizes"]) if "pixel_values" in inputs else None
        inputs_embeds = self.embed(input_ids, features)
        metrics.vision_s = time.perf_counter() - vision_start

        tokens = self.manifest.tokens
        eos = self._eos_ids()
        pad_id = tokens.pad_token_id if tokens.pad_token_id is not None else eos[0] if eos else 0
        sampler = make_sampler(settings["do_sample"], settings["temperature"], settings["top_k"], settings["top_p"], seed)
        sampler = with_min_new_tokens(sampler, eos, min_new_tokens)
        step_buffer = np.empty((input_ids.shape[0], 1, inputs_embeds.shape[-1]), dtype=self.sessions.decoder.dtype)
        table = self.embed_table

        def embed_step(ids: np.ndarray) -> np.ndarray:
            if table.dtype == step_buffer.dtype:
                return np.take(table, ids, axis=0, out=step_buffer)
            step_buffer[...] = np.take(table, ids, axis=0)
            return step_buffer

        answers, reasons = generate_tokens(
            self.sessions.decoder, inputs_embeds, attention_mask, embed_step, sampler,
            settings["max_new_tokens"], eos, pad_id, metrics, started,
        )
        metrics.total_s = time.perf_counter() - started
        results = [
            GenerationResult(text=self.processor.decode(answer), token_ids=answer, finish_reason=reason, metrics=metrics)
            for answer, reason in zip(answers, reasons)
        ]
        return results if batched else results[0]

    def _settings(self, max_new_tokens: int | None, do_sample: bool | None, temperature: float | None, top_k: int | None, top_p: float | None) -> dict[str, Any]:
        given = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        defaults = {**_SAMPLING_DEFAULTS, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}
        settings = {}
        for key, value in given.items():
            from_config = self.generation_config.get(key)
            settings[key] = value if value is not None else from_config if from_config is not None else defaults[key]
        if settings["max_new_tokens"] < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {settings['max_new_tokens']}")
        return settings

    def _eos_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", self.manifest.tokens.eos_token_ids)
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        limit = self.manifest.text.max_position_embeddings
        if prompt_tokens + max_new_tokens > limit:
            raise ValueError(
                f"the prompt is {prompt_tokens} tokens (images included) and max_new_tokens is {max_new_tokens}: "
                f"{prompt_tokens + max_new_tokens} positions, beyond the model's {limit}; shorten the prompt, "
                "use smaller or fewer images, or lower max_new_tokens"
            )


def load(bundle: str | Path, provider: str = "auto", **kwargs: Any) -> Pipeline:
    """Loads an exported bundle. `provider`: "auto" (CUDA when present), "cpu" or "cuda"."""
    return Pipeline(bundle, provider=provider, **kwargs)


def generate(bundle_or_pipe: str | Path | Pipeline, messages: Messages | Sequence[Messages], **kwargs: Any) -> GenerationResult | list[GenerationResult]:
    """One-call generation from a bundle path (loaded on the fly) or a loaded `Pipeline`."""
    pipe = bundle_or_pipe if isinstance(bundle_or_pipe, Pipeline) else load(bundle_or_pipe)
    return pipe.generate(messages=messages, **kwargs)
