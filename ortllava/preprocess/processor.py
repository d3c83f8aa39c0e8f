"""Text + images -> model inputs, with the semantics of transformers' `LlavaNextProcessor`.

Each `<image>` in the text is replaced by as many image tokens as the image yields features (see
`Processor.num_image_tokens`), then the text is tokenized. Images are consumed in order across the batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..embedding.features import unpadded_shape
from . import chat_template as templates
from .image import ImageProcessor, ImageProcessorConfig, image_sizes, num_tiles, select_best_resolution
from .image_source import ImageLike, image_source_kinds, load_image
from ..bundle.manifest import (
    CHAT_TEMPLATE_FILE,
    PREPROCESSOR_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    BundleError,
    Manifest,
    read_bundle_file,
    read_json_object,
)
from .inputs import check_encodable, flatten_images, images_in_messages, is_chat_batch, normalize_messages
from .tokenizer import BatchFeature, BundleTokenizer, check_return_tensors, pad_ids, truncates


class Processor:
    """Tokenizer, chat template and image processor of a bundle, shaped like `LlavaNextProcessor`."""

    model_input_names = ["pixel_values", "image_sizes", "input_ids", "attention_mask"]  # (what the call returns)

    def __init__(self, tokenizer: BundleTokenizer, image_processor: ImageProcessor, chat_template_source: str | None, manifest: Manifest):
        # Its settings (padding_side, truncation_side, the special tokens) are read at each call, as transformers'
        # processor reads them: `processor.tokenizer.padding_side = "left"` changes what the processor returns.
        self.tokenizer = tokenizer  # (its `backend_tokenizer`: the `tokenizers.Tokenizer` the processor calls)
        self.image_processor = image_processor
        self.chat_template = chat_template_source
        self.manifest = manifest
        tokens = manifest.tokens
        self.image_token = tokens.image_token
        self.image_token_id = tokens.image_token_id
        vision = manifest.vision
        self.patch_size = vision.patch_size
        self.vision_feature_select_strategy = vision.select_strategy  # ("default": the class token dropped)
        self.num_additional_image_tokens = vision.num_additional_image_tokens
        self.grid_pinpoints = image_processor.config.grid_pinpoints

    @property
    def image_sources(self) -> tuple[str, ...]:
        """The kinds of string an image may be given as (`image_source.IMAGE_SOURCES`): the image processor's."""
        return self.image_processor.image_sources

    @image_sources.setter
    def image_sources(self, kinds: tuple[str, ...]) -> None:
        self.image_processor.image_sources = image_source_kinds(kinds)

    @classmethod
    def from_bundle(cls, bundle: Path, manifest: Manifest) -> Processor:
        backend = read_bundle_file(bundle, TOKENIZER_FILE, lambda path: Tokenizer.from_file(str(path)))
        backend.no_padding()
        backend.no_truncation()
        image_id = backend.token_to_id(manifest.tokens.image_token)
        if image_id != manifest.tokens.image_token_id:
            raise BundleError(
                f"bundle {bundle} does not match its manifest: the tokenizer gives {manifest.tokens.image_token} the id {image_id}, "
                f"the manifest says {manifest.tokens.image_token_id}"
            )
        config = read_bundle_file(bundle, PREPROCESSOR_CONFIG_FILE, lambda path: ImageProcessorConfig.from_dict(read_json_object(path)))
        _check_grid(bundle, config, manifest)
        has_template = (bundle / CHAT_TEMPLATE_FILE).is_file()
        template = read_bundle_file(bundle, CHAT_TEMPLATE_FILE, _read_template) if has_template else None
        has_config = (bundle / TOKENIZER_CONFIG_FILE).is_file()
        tokenizer_config = read_bundle_file(bundle, TOKENIZER_CONFIG_FILE, read_json_object) if has_config else {}
        tokenizer = BundleTokenizer(backend, manifest, tokenizer_config, name_or_path=str(bundle))
        return cls(tokenizer, ImageProcessor(config), template, manifest)

    # ----------------------------------------------------------------------------------------------
    # Image tokens

    def num_image_tokens(self, height: int, width: int) -> int:
        """Features (= `<image>` tokens) of an image of (height, width): base tile, unpadded grid, row newlines."""
        tile = self.image_processor.config.tile_size
        best_h, best_w = select_best_resolution((height, width), self.grid_pinpoints)
        scale_h, scale_w = best_h // tile, best_w // tile
        patches_h = patches_w = tile // self.patch_size
        # The grid's features unpadded back to the image's aspect ratio, as `pack_image` packs them.
        current_h, current_w = unpadded_shape((height, width), (patches_h * scale_h, patches_w * scale_w))
        count = current_h * current_w + current_h + patches_h * patches_w + self.num_additional_image_tokens
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def tile_counts(self, image_sizes: np.ndarray) -> list[int]:
        """Each image's tiles (the base image included) by its `[height, width]` (`image_sizes [n_images, 2]`)."""
        tile = self.image_processor.config.tile_size
        return [num_tiles(tuple(size), self.grid_pinpoints, tile) for size in np.asarray(image_sizes).tolist()]

    # ----------------------------------------------------------------------------------------------
    # The processor call

    def __call__(
        self,
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | ImageLike | None = None,
        text: str | Sequence[str] | None = None,
        padding: bool | str = False,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: bool | str | None = None,
        return_attention_mask: bool = True,
        return_tensors: str | None = None,
        pad_to_multiple_of: int | None = None,
        return_mm_token_type_ids: bool = False,
        pixel_values: bool = True,
    ) -> BatchFeature:
        """`LlavaNextProcessor`'s call, with numpy arrays: -> `input_ids [B, T]`, `attention_mask [B, T]`, and
        with images `pixel_values [n_images, max_tiles, 3, S, S]` and `image_sizes [n_images, 2]`.

        `padding=True` (or "longest") pads to the longest prompt, "max_length" to `max_length` (or the longest,
        if longer), on `padding_side` (default: the tokenizer's). `truncation` (True, "longest_first" or
        "only_first") cuts each prompt to `max_length` tokens on the tokenizer's `truncation_side`, and so does a
        `max_length` given without padding or truncation, as in transformers; a cut into an image's tokens is a
        ValueError. `return_tensors`: None or "np" (arrays either way). `pad_to_multiple_of`: a padded length rounded up
        to a multiple of it. `return_mm_token_type_ids`: also `mm_token_type_ids [B, T]`, 1 at image tokens, as
        transformers' (`Pipeline.generate` takes it back). `pixel_values=False` leaves the pixels out
        (`image_sizes` alone sets the token counts): a chat turn preprocesses only the images its cache does not hold.
        """
        check_return_tensors(return_tensors)
        if text is not None and not (isinstance(text, str) or isinstance(text, (list, tuple)) and text):
            # (an empty batch, as the tokenizer refuses it: no rows to pad; before any image is read)
            got = f"an empty {type(text).__name__}" if isinstance(text, (list, tuple)) else type(text).__name__
            raise TypeError(f"text must be a string or a non-empty list of strings, got {got}")
        padding, max_length = self.tokenizer.padding_and_length(padding, truncation, max_length, pad_to_multiple_of)
        truncate = truncates(truncation, padding, max_length)
        flat_images = [load_image(image, sources=self.image_sources) for image in flatten_images(images)] if images is not None else []
        if not flat_images:  # `[]` (or an empty list per prompt) is no images, as in a chat turn
            images = None
        if text is None and images is None:
            raise ValueError("give text, images or both")
        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        if texts is not None:
            check_encodable(texts)

        data = BatchFeature()
        if texts is not None:
            counts = [sample.count(self.image_token) for sample in texts]
            if sum(counts) != len(flat_images):
                raise ValueError(
                    f"the prompts hold {sum(counts)} {self.image_token} token(s) but {len(flat_images)} image(s) were given; "
                    f"each {self.image_token} in the text takes one image, in order"
                )
            per_prompt = images is not None and isinstance(images, (list, tuple)) and len(images) == len(texts) > 1
            if per_prompt and all(isinstance(entry, (list, tuple)) for entry in images):  # a list of images per prompt
                for row, (count, entry) in enumerate(zip(counts, images)):  # (transformers flattens them: a shift goes unseen)
                    if count != len(flatten_images(entry)):
                        raise ValueError(
                            f"prompt {row} holds {count} {self.image_token} token(s) but its list of images has "
                            f"{len(flatten_images(entry))}: each prompt's list gives its own {self.image_token} tokens their images"
                        )
        pixels = self.image_processor(flat_images) if images is not None and pixel_values else None
        sizes = None  # [n_images, 2], where there are images
        if images is not None:
            sizes = pixels["image_sizes"] if pixels is not None else image_sizes(flat_images)
        if texts is not None:
            expanded = self.expand_image_tokens(texts, sizes)
            if truncate:  # (the special tokens are added after the cut, so that they stay)
                encodings = self.tokenizer.backend_tokenizer.encode_batch(expanded, add_special_tokens=False)
                ids = [self._truncated(encoding, max_length, add_special_tokens, row) for row, encoding in enumerate(encodings)]
            else:
                ids = [encoding.ids for encoding in self.tokenizer.backend_tokenizer.encode_batch(expanded, add_special_tokens=add_special_tokens)]
            data.update(self.pad(ids, padding=padding, padding_side=padding_side, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of))
            if not return_attention_mask:
                del data["attention_mask"]
            if return_mm_token_type_ids:
                data["mm_token_type_ids"] = (data["input_ids"] == self.image_token_id).astype(np.int64)
        if pixels is not None:
            data.update(pixels)
        elif sizes is not None:
            data["image_sizes"] = sizes
        return data

    def _truncated(self, encoding: Encoding, max_length: int, add_special_tokens: bool, row: int) -> list[int]:
        """A prompt's ids (`encoding`: without special tokens) cut on the truncation side so that, with the special
        tokens added after, they are at most `max_length`, as the tokenizer's own truncation does (a BOS is never
        cut); a ValueError where that drops image tokens (the images' features would no longer match them, which
        transformers' processor refuses too)."""
        images = encoding.ids.count(self.image_token_id)
        ids = self.tokenizer.truncated(encoding, max_length, add_special_tokens)
        dropped = images - ids.count(self.image_token_id)
        if dropped:
            raise ValueError(
                f"truncating prompt {row} to max_length={max_length} tokens would drop {dropped} of its {images} image tokens "
                f"({self.image_token}, expanded per image): raise max_length, or shorten the text"
            )
        return ids

    def check_model_inputs(self, input_ids: Any, attention_mask: Any = None, pixel_values: Any = None, image_sizes: Any = None) -> BatchFeature:
        """Model inputs made elsewhere (this processor's outputs, transformers' with `return_tensors="np"`, or one's
        own token ids), checked before any graph runs: `input_ids [B, T]` (or `[T]`: one row) of the vocabulary,
        `attention_mask` of its shape in 0 and 1 (default: all ones), and where the ids hold image tokens,
        `pixel_values [n_images, max_tiles, 3, S, S]` with `image_sizes [n_images, 2]` giving as many features as
        there are image tokens. -> the arrays as `__call__` returns them (int64 ids and mask, float32 pixels)."""

        def array(name: str, value: Any, kind: str) -> np.ndarray:
            try:
                out = np.asarray(value)
            except ValueError as error:  # ragged lists
                raise ValueError(f"{name} must be a rectangular array: {error}") from None
            if out.size and out.dtype.kind not in kind:
                raise TypeError(f"{name} must hold {'integers' if 'f' not in kind else 'numbers'}, got dtype {out.dtype}")
            return out

        ids = array("input_ids", input_ids, "iu")
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or not ids.size:
            raise ValueError(f"input_ids must be [batch, tokens] (or [tokens]) and not empty, got shape {list(np.shape(input_ids))}")
        vocab = self.manifest.text.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"input_ids hold {int(ids.min() if ids.min() < 0 else ids.max())}, outside the model's vocabulary of {vocab}")
        mask = np.ones_like(ids) if attention_mask is None else array("attention_mask", attention_mask, "iubf")
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask must be 0s and 1s of input_ids' shape {list(ids.shape)}, got shape {list(mask.shape)}")
        data = BatchFeature(input_ids=ids.astype(np.int64), attention_mask=mask.astype(np.int64))

        is_image = ids == self.image_token_id
        if (is_image & (mask == 0)).any():  # (transformers would splice features there; the runtime drops padding)
            raise ValueError("input_ids hold image tokens where attention_mask is 0: an image's tokens cannot be padding")
        image_tokens = int(is_image.sum())
        if (pixel_values is None) != (image_sizes is None):
            raise ValueError("give pixel_values and image_sizes together (as the processor returns them)")
        if pixel_values is not None and np.size(pixel_values) == 0 and np.size(image_sizes) == 0:
            pixel_values = image_sizes = None  # empty lists: no images
        if pixel_values is None:
            if image_tokens:
                raise ValueError(f"input_ids hold {image_tokens} image tokens but no pixel_values and image_sizes were given")
            return data
        pixels, sizes = array("pixel_values", pixel_values, "fiu"), array("image_sizes", image_sizes, "iu")
        tile = self.image_processor.config.tile_size
        if pixels.ndim != 5 or pixels.shape[2:] != (3, tile, tile):
            raise ValueError(f"pixel_values must be [n_images, max_tiles, 3, {tile}, {tile}], got shape {list(pixels.shape)}")
        if sizes.shape != (len(pixels), 2) or (sizes < 1).any():
            raise ValueError(f"image_sizes must be [n_images, 2] = [{len(pixels)}, 2] of (height, width), got {sizes.tolist()}")
        wanted_tiles = self.tile_counts(sizes)
        if max(wanted_tiles, default=0) > pixels.shape[1]:
            raise ValueError(f"pixel_values hold {pixels.shape[1]} tiles per image; image_sizes {sizes.tolist()} need {max(wanted_tiles)}")
        used = [image[:count] for image, count in zip(pixels, wanted_tiles)]  # (the padding tiles are not read)
        if pixels.dtype.kind == "f" and not all(np.isfinite(image).all() for image in used):
            raise ValueError("pixel_values hold NaN or infinite values")
        features = sum(self.num_image_tokens(height, width) for height, width in sizes.tolist())
        if features != image_tokens:
            raise ValueError(
                f"input_ids hold {image_tokens} image tokens but the {len(sizes)} image(s) of image_sizes give {features} features: "
                "expand each <image> with the processor"
            )
        data.update(pixel_values=pixels.astype(np.float32, copy=False), image_sizes=sizes.astype(np.int64))
        return data

    def expand_image_tokens(self, texts: list[str], image_sizes: np.ndarray | None) -> list[str]:
        """Each `<image>` in `texts` -> as many image tokens as that image gives features (images in order)."""
        if image_sizes is None or len(image_sizes) == 0:
            return texts
        sizes = iter(image_sizes.tolist())
        expanded = []
        for sample in texts:
            parts = sample.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                height, width = next(sizes)
                pieces.append(self.image_token * self.num_image_tokens(height, width))
                pieces.append(part)
            expanded.append("".join(pieces))
        return expanded

    def pad(
        self, ids: list[list[int]], padding: bool | str = True, padding_side: str | None = None, max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Ragged token ids -> `input_ids` and `attention_mask` `[B, T]` int64 (`padding`: see `__call__`)."""
        return pad_ids(ids, self.tokenizer.pad_token_id, padding_side or self.tokenizer.padding_side, padding, max_length, pad_to_multiple_of)

    # ----------------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = False,
        return_tensors: str | None = None,
        return_dict: bool = False,
        processor_kwargs: dict[str, Any] | None = None,
        return_assistant_tokens_mask: bool = False,
        sanitize_control_tokens: bool = False,
        pixel_values: bool = True,
        **kwargs: Any,
    ) -> str | list[str] | np.ndarray | BatchFeature:
        """Renders the chat template as transformers' `ProcessorMixin.apply_chat_template` does (its messages
        normalized the same way: keys set to None dropped, OpenAI `image_url` blocks made `image` ones). With
        `tokenize=True`, the `input_ids [B, T]` of the rendered text, or with `return_dict=True` the processor's
        whole output for it and the conversation's images (a leading BOS in the text is not added twice;
        `pixel_values=False`: without the pixels, as `__call__`). `kwargs` the template reads are its variables;
        the others, like `processor_kwargs`, go to the processor's call.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this bundle has no chat template: pass chat_template=... or give a prompt string")
        batched = is_chat_batch(conversation)
        conversations = [normalize_messages(c) for c in (conversation if batched else [conversation])]
        templates.check_options(conversations, add_generation_prompt, continue_final_message, return_assistant_tokens_mask, sanitize_control_tokens)
        read = templates.template_variables(template)
        variables = {**self.manifest.special_tokens_map, **{k: v for k, v in kwargs.items() if k in read}}
        processor_kwargs = {**(processor_kwargs or {}), **{k: v for k, v in kwargs.items() if k not in read}}
        prompts = [
            templates.render(template, c, add_generation_prompt, continue_final_message, tools, documents, **variables) for c in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [image for c in conversations for image in images_in_messages(c)]
        processor_kwargs.setdefault("padding", len(prompts) > 1)
        bos = self.tokenizer.bos_token
        if bos is not None and prompts[0].startswith(bos):  # (as transformers, even if asked otherwise)
            processor_kwargs["add_special_tokens"] = False
        inputs = self(text=prompts, images=images or None, return_tensors=return_tensors, pixel_values=pixel_values, **processor_kwargs)
        return inputs if return_dict else inputs["input_ids"]

    # ----------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, ids: int | Sequence[int] | np.ndarray, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """The tokenizer's `decode` (as transformers' processor forwards it)."""
        return self.tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """The tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)


def _read_template(path: Path) -> str:
    """A chat template's source, compiled once here so that a damaged one fails at load (as a BundleError)."""
    source = path.read_text(encoding="utf-8")
    templates.compile_template(source)
    return source


def _check_grid(bundle: Path, config: ImageProcessorConfig, manifest: Manifest) -> None:
    """A BundleError where the preprocessor's tiles or grid (which cut the tiles) and the manifest's (the vision
    encoder's input; the grid that packs their features) differ, or where a grid resolution is not whole tiles (transformers' model cannot run such a grid: it
    preprocesses ceil(side / tile) tiles per side and packs floor(side / tile))."""
    pinpoints, tile = config.grid_pinpoints, config.tile_size
    if tile != manifest.vision.image_size:
        raise BundleError(
            f"bundle {bundle} does not match its manifest: {PREPROCESSOR_CONFIG_FILE} cuts {tile} px tiles, the vision encoder "
            f"takes {manifest.vision.image_size} px ones"
        )
    if pinpoints != manifest.vision.grid_pinpoints:
        raise BundleError(
            f"bundle {bundle} does not match its manifest: {PREPROCESSOR_CONFIG_FILE} has image_grid_pinpoints {pinpoints}, "
            f"the manifest {manifest.vision.grid_pinpoints}"
        )
    partial = [point for point in pinpoints if point[0] % tile or point[1] % tile]
    if partial:
        raise BundleError(f"bundle {bundle}: the grid resolutions {partial} in {PREPROCESSOR_CONFIG_FILE} are not multiples of its {tile} px tiles")
