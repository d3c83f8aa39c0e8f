"""Text + images -> model inputs, with the semantics of transformers' `LlavaNextProcessor`.

Each `<image>` in the text is replaced by as many image tokens as the image yields features (see
`Processor.num_image_tokens`), then the text is tokenized. Images are consumed in order across the batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import Tokenizer

from . import chat_template as templates
from .image import ImageLike, ImageProcessor, ImageProcessorConfig, image_sizes, load_image, select_best_resolution
from .manifest import (
    CHAT_TEMPLATE_FILE,
    PREPROCESSOR_CONFIG_FILE,
    TOKENIZER_FILE,
    Manifest,
    read_bundle_file,
)

_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Processor:
    """Tokenizer, chat template and image processor of a bundle, shaped like `LlavaNextProcessor`."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, chat_template_source: str | None, manifest: Manifest):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template_source
        self.manifest = manifest
        tokens = manifest.tokens
        self.image_token = tokens.image_token
        self.image_token_id = tokens.image_token_id
        self.bos_token = tokens.bos_token
        self.pad_token_id = tokens.pad_token_id
        self.padding_side = tokens.padding_side
        vision = manifest.vision
        self.patch_size = vision.patch_size
        self.select_strategy = vision.select_strategy
        self.num_additional_image_tokens = vision.num_additional_image_tokens
        self.grid_pinpoints = image_processor.config.grid_pinpoints

    @classmethod
    def from_bundle(cls, bundle: Path, manifest: Manifest) -> Processor:
        tokenizer = read_bundle_file(bundle, TOKENIZER_FILE, lambda path: Tokenizer.from_file(str(path)))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        config = read_bundle_file(bundle, PREPROCESSOR_CONFIG_FILE, lambda path: ImageProcessorConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        has_template = (bundle / CHAT_TEMPLATE_FILE).is_file()
        template = read_bundle_file(bundle, CHAT_TEMPLATE_FILE, lambda path: path.read_text(encoding="utf-8")) if has_template else None
        return cls(tokenizer, ImageProcessor(config), template, manifest)

    # ----------------------------------------------------------------------------------------------
    # Image tokens

    def num_image_tokens(self, height: int, width: int) -> int:
        """Features (= `<image>` tokens) of an image of (height, width): base tile, unpadded grid, row newlines."""
        tile = self.image_processor.config.tile_size
        best_h, best_w = select_best_resolution((height, width), self.grid_pinpoints)
        scale_h, scale_w = best_h // tile, best_w // tile
        patches_h = patches_w = tile // self.patch_size
        current_h, current_w = patches_h * scale_h, patches_w * scale_w
        # The grid's features are unpadded back to the image's aspect ratio (see features.unpad).
        if width / height > current_w / current_h:
            new_h = int(round(height * (current_w / width), 7))
            current_h -= ((current_h - new_h) // 2) * 2
        else:
            new_w = int(round(width * (current_h / height), 7))
            current_w -= ((current_w - new_w) // 2) * 2
        count = current_h * current_w + current_h + patches_h * patches_w + self.num_additional_image_tokens
        return count - 1 if self.select_strategy == "default" else count

    # ----------------------------------------------------------------------------------------------
    # The processor call

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | ImageLike | None = None,
        padding: bool | str = False,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        pixel_values: bool = True,
    ) -> dict[str, np.ndarray]:
        """-> `input_ids [B, T]`, `attention_mask [B, T]`, and with images `pixel_values
        [n_images, max_tiles, 3, S, S]` and `image_sizes [n_images, 2]`.

        `padding=True` (or "longest") pads to the longest prompt on `padding_side` (default: the tokenizer's).
        `pixel_values=False` leaves the pixels out (`image_sizes` alone sets the token counts): a chat turn
        preprocesses only the images its cache does not hold.
        """
        flat_images = [load_image(image) for image in flatten_images(images)] if images is not None else []
        if not flat_images:  # `[]` (or an empty list per prompt) is no images, as in a chat turn
            images = None
        if text is None and images is None:
            raise ValueError("give text, images or both")
        texts = [text] if isinstance(text, str) else (list(text) if text is not None else None)
        if texts is not None:
            check_encodable(texts)

        data: dict[str, np.ndarray] = {}
        if images is not None:
            data.update(self.image_processor(flat_images) if pixel_values else {"image_sizes": image_sizes(flat_images)})
        if texts is None:
            return data

        counts = [sample.count(self.image_token) for sample in texts]
        if sum(counts) != len(flat_images):
            raise ValueError(
                f"the prompts hold {sum(counts)} {self.image_token} token(s) but {len(flat_images)} image(s) were given; "
                f"each {self.image_token} in the text takes one image, in order"
            )
        expanded = self.expand_image_tokens(texts, data.get("image_sizes"))
        encodings = self.tokenizer.encode_batch(expanded, add_special_tokens=add_special_tokens)
        ids = [encoding.ids for encoding in encodings]
        data.update(self.pad(ids, padding=padding, padding_side=padding_side))
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

    def pad(self, ids: list[list[int]], padding: bool | str = True, padding_side: str | None = None) -> dict[str, np.ndarray]:
        """Ragged token ids -> `input_ids` and `attention_mask` `[B, T]` int64."""
        longest = max(len(row) for row in ids)
        if not padding and any(len(row) != longest for row in ids):
            raise ValueError("the prompts tokenize to different lengths: pass padding=True to pad them")
        side = padding_side or self.padding_side
        pad_id = self.pad_token_id if self.pad_token_id is not None else 0
        input_ids = np.full((len(ids), longest), pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), longest), dtype=np.int64)
        for row, tokens in enumerate(ids):
            span = slice(longest - len(tokens), longest) if side == "left" else slice(0, len(tokens))
            input_ids[row, span] = tokens
            mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # ----------------------------------------------------------------------------------------------
    # Chat

    def apply_chat_template(
        self,
        messages: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        return_dict: bool = False,
        pixel_values: bool = True,
        **kwargs: Any,
    ) -> str | list[str] | np.ndarray | dict[str, np.ndarray]:
        """Renders the chat template as transformers does. With `tokenize=True`, the `input_ids [B, T]` of the
        rendered text, or with `return_dict=True` the processor's whole output for it and the conversation's
        images (a leading BOS in the text is not added twice; `pixel_values=False`: without the pixels, as
        `__call__`).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this bundle has no chat template: pass chat_template=... or give a prompt string")
        batched = is_chat_batch(messages)
        conversations = messages if batched else [messages]
        variables = {**self.manifest.special_tokens_map, **kwargs}
        prompts = [templates.render(template, list(c), add_generation_prompt=add_generation_prompt, **variables) for c in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [image for conversation in conversations for image in images_in_messages(conversation)]
        add_special = not (self.bos_token is not None and prompts[0].startswith(self.bos_token))
        inputs = self(text=prompts, images=images or None, padding=len(prompts) > 1, add_special_tokens=add_special, pixel_values=pixel_values)
        return inputs if return_dict else inputs["input_ids"]

    # ----------------------------------------------------------------------------------------------
    # Decoding

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; special tokens kept unless `skip_special_tokens` (transformers' default)."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.manifest.tokens.clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def is_chat_batch(messages: Sequence[Any]) -> bool:
    """Whether `messages` is a list of chats (each a list of message dicts) rather than one chat."""
    return bool(messages) and isinstance(messages[0], (list, tuple))


def images_in_messages(messages: list[dict]) -> list[ImageLike]:
    """The images of a Hugging Face chat, in order: content items of type "image" with "image", "path" or "url"."""
    found = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for item in content:
            if not isinstance(item, dict) or item.get("type") not in ("image", "image_url"):
                continue
            source = item.get("image", item.get("path", item.get("url")))
            if source is None and isinstance(item.get("image_url"), dict):
                source = item["image_url"].get("url")
            if source is None:
                raise ValueError(f"an image item needs an 'image', 'path' or 'url' key, got {sorted(item)}")
            found.append(source)
    return found


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: the spaces a tokenizer puts before punctuation and contractions."""
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text


def check_encodable(texts: Sequence[str]) -> None:
    """A ValueError naming the first prompt that is not valid Unicode text (lone surrogates: undecodable bytes
    read with Python's `surrogateescape`, as from a terminal or a pipe), which the tokenizer cannot take."""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"the text must be a string or a list of strings; item {index} is a {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            where = f"prompt {index}" if len(texts) > 1 else "the prompt"
            raise ValueError(
                f"{where} is not valid text: {text[max(error.start - 20, 0) : error.start]!r} is followed by "
                f"{text[error.start : error.end]!r}, which is no character (bytes that are not UTF-8?)"
            ) from None


def flatten_images(images: Any) -> list[ImageLike]:
    """Images given singly, in a list, or in a list per prompt -> one flat list, in order."""
    if isinstance(images, (list, tuple)):
        return [image for entry in images for image in flatten_images(entry)]
    return [images]
