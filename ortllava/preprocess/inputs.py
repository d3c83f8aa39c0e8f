"""What a caller gives -> the processor's outputs, checked before any graph runs.

A caller gives a prompt (a string, or a list of them: a batch), a chat (`messages`: a list of message dicts
`{"role": ..., "content": ...}` in Hugging Face's or OpenAI's form, or a list of chats), images (singly, in a
list, in a list per prompt, or inside the messages), or processor outputs made elsewhere (`input_ids`, ...).
Each form becomes the processor's outputs, `input_ids [B, T]` and `attention_mask [B, T]` (+ `pixel_values`,
`image_sizes`), or a TypeError or ValueError that names what is malformed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .image_source import ImageLike
from .tokenizer import BatchFeature

if TYPE_CHECKING:
    from .processor import Processor


def prepare_inputs(
    processor: Processor, prompt: Any = None, images: Any = None, messages: Any = None, pixel_values: bool = True,
) -> tuple[BatchFeature, bool]:
    """Prompt text or chat messages (+ images) -> processor outputs (prompts padded on the left), and whether the
    input was a batch (`pixel_values=False`: `image_sizes` without the pixels, see `Processor.__call__`). A chat that
    ends with an assistant message is continued, as transformers' pipeline does (one without content, such as a
    tool call, is not)."""
    messages = message_dicts(messages)  # (message objects: dataclasses, pydantic models)
    batched = is_batch(prompt, messages)
    if messages is None:
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        return processor(text=prompt, images=images, padding=True, padding_side="left", pixel_values=pixel_values), batched
    if images is not None:
        raise ValueError("with messages=..., put the images inside the messages")
    if not processor.chat_template:
        raise ValueError("this bundle has no chat template: give prompt=... instead of messages=...")
    ends = {chat[-1]["role"] == "assistant" and chat[-1].get("content") is not None for chat in (messages if batched else [messages])}
    if len(ends) > 1:
        raise ValueError("in a batch of chats, every chat or none must end with an assistant message (to be continued)")
    continued = ends.pop()
    inputs = processor.apply_chat_template(
        list(messages), add_generation_prompt=not continued, continue_final_message=continued, tokenize=True, return_dict=True,
        pixel_values=pixel_values, processor_kwargs={"padding_side": "left"},
    )
    return inputs, batched


def given_model_inputs(
    processor: Processor, prompt: Any, images: Any, messages: Any, input_ids: Any, attention_mask: Any, pixel_values: Any, image_sizes: Any,
    mm_token_type_ids: Any = None,
) -> BatchFeature | None:
    """The caller's processor outputs, checked (`Processor.check_model_inputs`); None where a prompt or chat is given
    instead. `mm_token_type_ids` (the processor's with `return_mm_token_type_ids=True`) must mark the image tokens;
    the image tokens themselves say where the features go, so they are not needed."""
    if input_ids is None:
        if not (attention_mask is None and pixel_values is None and image_sizes is None and mm_token_type_ids is None):
            raise ValueError("attention_mask, pixel_values, image_sizes and mm_token_type_ids come with input_ids")
        return None
    if not (prompt is None and images is None and messages is None):
        raise ValueError("give either input_ids=... (processor outputs) or prompt=.../messages=..., not both")
    inputs = processor.check_model_inputs(input_ids, attention_mask, pixel_values, image_sizes)
    if mm_token_type_ids is not None:
        types = np.asarray(mm_token_type_ids)
        types = types[None] if types.ndim == 1 else types
        if types.shape != inputs["input_ids"].shape or not np.array_equal(types != 0, inputs["input_ids"] == processor.image_token_id):
            raise ValueError("mm_token_type_ids must be input_ids' shape, 1 at its image tokens and 0 elsewhere (as the processor gives them)")
    return inputs


def left_aligned(processor: Processor, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """`inputs` with every prompt ending at the last column, as generation needs (a chat batch, or a caller's
    `input_ids`, may be padded on the right: those rows are padded on the left again); a ValueError for a prompt of
    no tokens."""
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    empty = np.flatnonzero(attention_mask.sum(axis=1) == 0)
    if len(empty):  # (a tokenizer without a BOS token turns an empty prompt into no tokens at all)
        raise ValueError(f"prompt {int(empty[0])} of the batch is empty: it gives no tokens to start from")
    if (attention_mask[:, -1] == 1).all():
        return inputs
    ids = [row[mask == 1].tolist() for row, mask in zip(input_ids, attention_mask)]
    return {**inputs, **processor.pad(ids, padding=True, padding_side="left")}


def is_batch(prompt: Any, messages: Any) -> bool:
    """Whether `prompt` (a string, or a list of them) or `messages` (a chat: a list of message dicts, or a
    list of chats) is a batch; a TypeError or ValueError names what is malformed."""
    if (prompt is None) == (messages is None):
        raise ValueError("give either prompt=... or messages=..., not both and not neither")
    if messages is not None:
        if not isinstance(messages, (list, tuple)) or not messages:
            hint = "; a prompt string goes in Pipeline.generate(prompt=...)" if isinstance(messages, str) else ""
            raise TypeError(f"messages must be a non-empty list of message dicts (a chat) or of chats, got {type(messages).__name__}{hint}")
        messages = message_dicts(messages)
        batched = is_chat_batch(messages)
        chats = messages if batched else [messages]
        for chat in chats:
            if not isinstance(chat, (list, tuple)) or not chat or not all(isinstance(message, dict) and "role" in message for message in chat):
                raise TypeError("each chat must be a non-empty list of messages: dicts (or objects) with a 'role' (and a 'content')")
        return batched
    if isinstance(prompt, str):
        return False
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(text, str) for text in prompt):
        hint = "; chat messages go in messages=..." if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (dict, list)) else ""
        if isinstance(prompt, Mapping) and "input_ids" in prompt:  # (a processor's output, passed as one argument)
            hint = "; a processor's output goes in as keyword arguments: generate(**inputs)"
        elif isinstance(prompt, Mapping) and "role" in prompt:
            hint = "; a chat goes in messages=[...], a list of such messages"
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}{hint}")
    return True


# Content parts a LLaVA-NeXT chat template renders (after OpenAI's forms are mapped to them: `_image_block`).
CONTENT_TYPES = ("text", "image")


def message_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models such as the OpenAI SDK's messages) and the objects inside them
    (content parts, tool calls) as dicts, in lists and tuples as given, as transformers 5 converts them
    (`_message_objects_to_dicts`): a pydantic model by its `model_dump()`, recognised by that method (pydantic is not
    imported). Anything else (strings, numbers, images, arrays) as given."""
    if isinstance(value, Mapping):
        return {key: message_dicts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [message_dicts(item) for item in value]
    if isinstance(value, tuple):
        return tuple(message_dicts(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # (not `asdict`: it deep-copies the images too)
        return {field.name: message_dicts(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return message_dicts(value.model_dump())
    return value


def chat_messages(conversation: Sequence[Any]) -> list[dict]:
    """A chat as transformers 5 takes it before anything else (`_normalize_chat_messages`, its tokenizer's and its
    processors'): message objects as dicts (`message_dicts`), and the keys set to None dropped (OpenAI clients send
    `content=None`, `tool_calls=None`: a template handles a missing key, where it may render "None")."""
    messages = []
    for message in message_dicts(list(conversation)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts (or dataclasses, pydantic models), got {message!r}")
        messages.append({key: value for key, value in message.items() if value is not None})
    return messages


def normalize_messages(conversation: Sequence[Any]) -> list[dict]:
    """A chat as transformers' processors normalize it before rendering: message objects as dicts and the keys set to
    None dropped (`chat_messages`), and OpenAI `{"type": "image_url", "image_url": {"url": ...}}` blocks (or with
    the URL as a string) made `{"type": "image", "url": ...}`; OpenAI's Responses forms too ("input_text",
    "output_text", "input_image"). A part of another type (or of none) is a ValueError: the template would render it
    as nothing, and the answer would be to a message without it."""
    normalized = []
    for index, message in enumerate(chat_messages(conversation)):
        if isinstance(message.get("content"), list):
            message["content"] = [_image_block(block) for block in message["content"]]
            for block in message["content"]:  # (a template would render it as nothing: an answer to an empty message)
                if isinstance(block, dict) and block.get("type") not in CONTENT_TYPES:
                    kind = f"of type {block['type']!r}" if "type" in block else f"without a 'type' (its keys: {', '.join(map(repr, block))})"
                    raise ValueError(
                        f"message {index} has a content part {kind}, which the chat template would leave out: give "
                        "{'type': 'text', 'text': ...} or {'type': 'image', 'image'|'url'|'path': ...} (or OpenAI's 'image_url')"
                    )
                if isinstance(block, dict) and block.get("type") == "text" and block.get("text") is None:
                    others = ", ".join(repr(key) for key in block if key != "type") or "none"
                    what = "is None" if "text" in block else f"is missing (its other keys: {others})"
                    raise ValueError(f"message {index} has a text item whose 'text' {what}: give {{'type': 'text', 'text': '...'}}")
        normalized.append(message)
    return normalized


def _image_block(block: Any) -> Any:
    """OpenAI's content parts as transformers' (its Chat Completions "image_url"; its Responses API's "input_image" and
    "input_text"); other parts as given."""
    if isinstance(block, dict) and block.get("type") in ("image_url", "input_image"):
        if "file_id" in block and "image_url" not in block:
            raise ValueError(f"an {block['type']} part with a file_id ({block['file_id']!r}): give the image itself (image_url with a URL or data: URI)")
        if "image_url" not in block:  # ({"type": "image_url", "url": ...}: the source under transformers' keys)
            return {**block, "type": "image"}
        source = block["image_url"]
        return {"type": "image", "url": source.get("url", "") if isinstance(source, dict) else source}
    if isinstance(block, dict) and block.get("type") in ("input_text", "output_text"):
        return {"type": "text", "text": block.get("text")}
    return block


def is_chat_batch(messages: Sequence[Any]) -> bool:
    """Whether `messages` is a list of chats (each a list of message dicts) rather than one chat."""
    return bool(messages) and isinstance(messages[0], (list, tuple))


def images_in_messages(messages: list[dict]) -> list[ImageLike]:
    """The images of a Hugging Face chat, in order: content items of type "image" with "image", "path" or "url"."""
    found = []
    for message in message_dicts(list(messages)):  # (message objects, or content parts, as dicts: an image part is found)
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for item in content:
            if not isinstance(item, dict) or item.get("type") not in ("image", "image_url", "input_image"):
                continue
            item = _image_block(item)
            source = next((item[key] for key in ("image", "url", "path", "base64") if item.get(key) is not None), None)
            if source is None:
                given = [key for key in ("image", "url", "path", "base64") if key in item]  # (each None)
                raise ValueError(
                    "an image item needs an 'image', 'url', 'path' or 'base64' key with an image in it, got "
                    + (f"{', '.join(repr(key) for key in given)} set to None" if given else "none of them")
                )
            found.append(source)
    return found


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
    """Images given singly, in a list, in a list per prompt, or as a 4-D array or tensor (one image per row, as
    transformers reads it) -> one flat list, in order."""
    if isinstance(images, (list, tuple)) or getattr(images, "ndim", None) == 4 and hasattr(images, "__array__"):  # (a tensor too)
        return [image for entry in images for image in flatten_images(entry)]
    return [images]
