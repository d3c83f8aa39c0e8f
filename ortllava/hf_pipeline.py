"""`ortllava.pipeline("image-text-to-text", model=bundle)`: transformers' pipeline form, on a bundle.

The call and the outputs are those of transformers' `ImageTextToTextPipeline` (transformers/pipelines/
image_text_to_text.py), built on `ortllava.api.Pipeline`:

    pipe = ortllava.pipeline("image-text-to-text", model="models/bundles/mistral-7b")
    pipe(text=messages, max_new_tokens=20, return_full_text=False)
    # [{"input_text": messages, "generated_text": "..."}]

Inputs, as transformers takes them:
- `text=` a chat (list of messages; images inside the messages as "image" / "url" / "path" items), or a list
  of chats (one result list per chat); the chat may also be the first positional argument. A chat ending in an
  assistant message is continued (`continue_final_message`, as transformers).
- `images=` one image or a list (PIL image, path, http(s) URL, array) with `text=` a prompt string holding one
  `<image>` per image, or a list of prompts (one batch, one result per prompt).
- `text=` a prompt string (or a list of them: one input each; a tuple: one batch) alone, for text-only generation;
  strings given first, without `text=`, are prompts too, as transformers reads them.
- An iterator of any of these (a generator; also as `text=`): an iterator of their results (an empty one: `[]`).
- Other keyword arguments of a call for a chat are its template's variables (`tools`, `documents`, `enable_thinking`,
  ...), as transformers passes them; `batch_size` groups chats (and the prompts of a list) into batches.

Outputs: `[{"input_text": ..., "generated_text": ...}]`. `return_full_text=False` gives the new text only;
the default (True) gives the prompt string + the new text, or for a chat the messages plus the new assistant
message. `return_tensors=True` gives `generated_token_ids` (the prompt's ids, images expanded, then the new
ids) instead of text: each record's own ids, where transformers' are its row of the batch's array, with the batch's
padding. The new text is found as transformers finds it: decode(prompt + new ids) with the
decoded prompt removed from its start.

Generation: `max_new_tokens`, `generate_kwargs={...}` (`Pipeline.generate`'s arguments: do_sample, temperature, top_k,
top_p, ..., max_new_tokens, max_length, num_return_sequences: that many records per input; transformers' `stop_strings`
with its `tokenizer`, as `stop_sequence`),
`stop_sequence` (generation ends once the string appears; it stays in the text, as with transformers' stop strings;
transformers matches them on token strings and can miss one next to a partial UTF-8 character, ortllava matches the
decoded text). Combined as transformers combines them: generation settings given directly at construction
(`max_new_tokens=`, `max_length=`, `do_sample=`, ...) apply to every call; a call's `generate_kwargs`,
`max_new_tokens` or `stop_sequence` replace the construction's `generate_kwargs` and `stop_sequence` whole. A call's
other generation settings given directly are applied last (transformers ignores them with a warning); a call's
direct `max_length` is refused (transformers hands it to the processor). A `generation_config` (a transformers
`GenerationConfig` or a dict of its fields; at construction, in a call's `generate_kwargs` or directly) is read as
`Pipeline.generate` reads it; a call's replaces the construction's generation settings, as in transformers.
`timeout` (seconds) applies to every http(s)
image; without it, `ortllava.preprocess.image_source.load_image`'s timeout and size limit apply.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from typing import Any, Collection, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from .api import Pipeline, load
from .bundle.sessions import is_provider
from .generation.generate import GenerationResult
from .generation.settings import GENERATION_ARGUMENTS
from .preprocess.image import image_sizes
from .preprocess.image_source import URL_TIMEOUT_S, load_image
from .preprocess.inputs import flatten_images, images_in_messages

TASK = "image-text-to-text"
# The generation settings the pipeline passes to `Pipeline.generate` (stop strings come as its `stop_sequence`;
# its records have no place for logits, as transformers' have not).
GENERATION_KEYS = tuple(name for name in GENERATION_ARGUMENTS if name not in ("stop", "output_logits"))
_GENERATION_INPUTS = (*GENERATION_KEYS, "generation_config")  # what may be given directly, at construction or in a call


def pipeline(task: str = TASK, model: str | os.PathLike | Pipeline | None = None, device: Any = None, provider: str | None = None, **kwargs: Any) -> ImageTextToTextPipeline:
    """transformers' `pipeline(task, model=...)` for a bundle: only "image-text-to-text".

    `model`: a bundle folder or a loaded `ortllava.Pipeline`. `device`: as transformers ("cpu", "cuda",
    "cuda:0", an index, -1 for CPU) or `provider` ("auto", "cpu", "cuda"); default "auto".
    Other keyword arguments, as transformers takes them: generation settings applied to every call (`max_new_tokens`,
    `max_length`, `do_sample`, ...), `generate_kwargs` (used by the calls that give none of their own), `batch_size`;
    and `Pipeline` options (`verify`, `io_binding`, `threads`, `prefix_cache`, `image_sources`; for others, such as the key/value
    buffers' `max_length`, pass `model=ortllava.load(bundle, ...)`).
    """
    if task != TASK:
        raise ValueError(f"ortllava.pipeline supports the task {TASK!r} only, got {task!r}")
    if model is None:
        raise ValueError("pass model=... : the folder of an exported bundle (or a loaded ortllava.Pipeline)")
    load_options = {key: kwargs.pop(key) for key in ("verify", "io_binding", "threads", "prefix_cache", "image_sources") if key in kwargs}
    if isinstance(model, Pipeline):
        if load_options:
            raise TypeError(f"{', '.join(load_options)} apply when loading a bundle; model= is already loaded")
        runtime = model
    else:
        runtime = load(model, provider=provider or _provider_for(device), **load_options)
    return ImageTextToTextPipeline(runtime, **kwargs)


def _provider_for(device: Any) -> str:
    if device is None:
        return "auto"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu" if device < 0 else f"cuda:{device}"
    text = str(device)
    if is_provider(text):
        return text
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or an index, got {device!r}")


class ImageTextToTextPipeline:
    """The pipeline object: call it as transformers' `ImageTextToTextPipeline`."""

    task = TASK

    def __init__(self, model: Pipeline, batch_size: int | None = None, **defaults: Any):
        self.model = model
        self.processor = model.processor
        self.batch_size = batch_size or 1
        # As transformers: generation settings given directly apply to every call; the rest (generate_kwargs and
        # stop_sequence among them) are the defaults of the call's own arguments.
        self._generation = {key: defaults.pop(key) for key in _GENERATION_INPUTS if key in defaults}
        self._defaults = self._split(defaults)

    # ----------------------------------------------------------------------------------------------
    # The call

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> list:
        if images is None and text is None:
            raise ValueError("You must at least provide either text or images.")
        for given in (images, text):  # (a dict's keys would otherwise be read as prompts)
            if isinstance(given, dict) and "role" in given:
                raise TypeError("one message dict is not a chat: a chat is a list of messages (give [message])")
        if images is None and isinstance(text, Iterator):  # (the same as given first)
            images, text = text, None
        if text is not None and not isinstance(text, (str, list, tuple)):
            raise TypeError(f"text must be a prompt string, a list of them, or a chat (a list of message dicts), got {type(text).__name__}")
        if text is None and isinstance(images, Iterator):  # an iterator of inputs (a generator): results as they come
            self._split(kwargs)  # (the call's arguments checked now, as transformers checks them)
            first = next(images, _NOTHING)
            if first is _NOTHING:
                return []  # (as transformers)
            inputs = itertools.chain([first], images)
            if isinstance(first, dict) and "role" in first:  # an iterator of messages is one chat, as transformers reads it
                return self(list(inputs), **kwargs)
            return (self._one_input(item, kwargs) for item in inputs)
        if text is None and _is_text(images):  # (as transformers: strings alone are prompts, even a path's)
            images, text = None, images
        given = self._split(kwargs)
        # A call's generate_kwargs (or max_new_tokens, stop_sequence: transformers builds them into one) replace the
        # construction's whole, as transformers fuses a call's parameters with the construction's.
        options = {part: {**self._defaults[part], **given[part]} for part in ("post", "pre")}
        options["call_template"] = given["pre"].get("template")  # (a construction's apply to chats only)
        call_generate = given["generate"] if given["generate_given"] else self._defaults["generate"]
        call = {**call_generate, **given["direct"]}
        # (a call's generation_config replaces the construction's generation settings, as transformers')
        options["generate"] = call if "generation_config" in call else {**self._generation, **call}
        if _is_chat(text):
            if images is not None:
                raise ValueError(
                    "Invalid input: you passed `chat` and `images` as separate input arguments. Images must be placed "
                    "inside the chat message's `content`, e.g. 'content': [{'type': 'image', 'url': 'image_url'}, "
                    "{'type': 'text', 'text': 'Describe the image.'}]"
                )
            return self._chats(text, options)
        if text is None and _is_chat(images):
            return self._chats(images, options)
        if images is not None and text is None:
            if isinstance(images, dict):  # {"images": ..., "text": ...}, as transformers
                if not {"images", "text"} <= set(images):  # (other keys, a dataset row's, are left alone, as transformers)
                    raise ValueError(f"an input dict takes the keys 'images' and 'text' (as transformers' pipeline), got {sorted(images)}")
                return self._prompts(images["images"], images["text"], options)
            raise ValueError("You must provide text for this pipeline.")
        if images is None:  # text only: a string or a tuple is one input, a list is one input per string (as transformers)
            if isinstance(text, (str, tuple)):
                return self._prompts(None, text, options)
            if any(isinstance(prompt, tuple) for prompt in text):  # (a tuple among them is one batch, as transformers)
                return [self._prompts(None, prompt, options) for prompt in text]
            items = [item for prompt in text for item in self._prompt_items(None, prompt, options)]
            results = self._run(items, options)  # (in groups of batch_size, as transformers batches the list's inputs)
            return [self._records([item], [answers], options) for item, answers in zip(items, results)]
        return self._prompts(images, text, options)

    def _one_input(self, item: Any, kwargs: dict[str, Any]) -> list:
        """One item of an iterator of inputs, read as transformers' `preprocess` reads it: a dict of images and
        text, a prompt string, a list (or tuple) of them as one batch, or a chat."""
        if isinstance(item, dict) and "role" not in item:
            return self(item, **kwargs)
        if _is_text(item):
            return self(text=tuple(item) if isinstance(item, list) else item, **kwargs)
        return self(text=item, **kwargs)

    def _split(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Call or construction arguments -> {"generate": {...} (generate_kwargs, stop_sequence, max_new_tokens),
        "generate_given": whether any of those was given, "direct": {...} (other generation settings, given
        directly: transformers ignores them in a call, ortllava applies them), "post": {...}, "pre": {...}}."""
        kwargs = dict(kwargs)
        generate_given = any(kwargs.get(key) is not None for key in ("generate_kwargs", "max_new_tokens", "stop_sequence"))
        generate = dict(kwargs.pop("generate_kwargs", None) or {})
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        if max_new_tokens is not None:
            if "max_new_tokens" in generate:
                raise ValueError(
                    "'max_new_tokens' is defined twice, once in 'generate_kwargs' and once as a direct parameter, please use only one"
                )
            generate["max_new_tokens"] = max_new_tokens
        if "max_length" in kwargs:  # (a call's max_length goes to transformers' processor; at construction it is taken first)
            raise TypeError("a call's max_length goes in generate_kwargs={'max_length': ...} (or give max_new_tokens)")
        direct = {key: kwargs.pop(key) for key in _GENERATION_INPUTS if key in kwargs}
        generate.pop("tokenizer", None)  # (transformers' generate matches stop_strings with it; ortllava has the bundle's)
        if generate.get("stop_strings") is None:
            generate.pop("stop_strings", None)
        stop = kwargs.pop("stop_sequence", None)
        if stop is not None:  # (as transformers: it replaces the generate_kwargs' stop_strings)
            generate.pop("stop_strings", None)
            generate["stop"] = [stop] if isinstance(stop, str) else list(stop)
        unknown = set(generate) - set(_GENERATION_INPUTS) - {"stop"}
        if unknown:
            raise TypeError(f"unsupported generation argument(s): {', '.join(sorted(unknown))}; supported: {', '.join(GENERATION_KEYS)}, generation_config, stop_sequence")

        post = {}
        return_full_text = kwargs.pop("return_full_text", None)
        return_tensors = kwargs.pop("return_tensors", None)
        return_type = kwargs.pop("return_type", None)
        if return_full_text is not None and return_type is None:
            if return_tensors is not None:
                raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
            return_type = "full_text" if return_full_text else "new_text"
        if return_tensors is not None and return_type is None:
            return_type = "tensors"  # as transformers: any return_tensors value asks for the ids
        if return_type is not None:
            name = getattr(return_type, "name", return_type)
            if not isinstance(name, str) or name.lower() not in ("full_text", "new_text", "tensors"):
                raise ValueError(f"return_type must be one of transformers' ReturnType (FULL_TEXT, NEW_TEXT, TENSORS) or its name, got {return_type!r}")
            post["return_type"] = name.lower()
        for key in ("clean_up_tokenization_spaces", "skip_special_tokens"):
            if kwargs.get(key) is not None:
                post[key] = kwargs.pop(key)
            kwargs.pop(key, None)

        pre = {}
        for key in ("timeout", "continue_final_message"):
            if kwargs.get(key) is not None:
                pre[key] = kwargs.pop(key)
            kwargs.pop(key, None)
        if kwargs.pop("processor_kwargs", None):
            raise TypeError("processor_kwargs are not supported: a bundle's processor settings are fixed at export")
        if kwargs.get("batch_size") is not None:
            pre["batch_size"] = kwargs.pop("batch_size")
        kwargs.pop("batch_size", None)
        kwargs.pop("num_workers", None)  # (a DataLoader's workers: inputs here are run in this process)
        refused = sorted(set(kwargs) & _RENDERING_OPTIONS)
        if refused:
            raise TypeError(f"unsupported argument(s): {', '.join(refused)} (the pipeline renders a chat's template as text itself)")
        kwargs.pop("padding", None)  # (a batch is padded anyway)
        if kwargs:  # transformers hands the rest to the chat template (its variables: tools, documents, ...)
            pre["template"] = kwargs
        return {"generate": generate, "generate_given": generate_given, "direct": direct, "post": post, "pre": pre}

    # ----------------------------------------------------------------------------------------------
    # Chats

    def _chats(self, chats: Any, options: dict) -> list:
        single = isinstance(chats[0], dict)
        conversations = [chats] if single else list(chats)  # each reported back as given (the same object)
        timeout = options["pre"].get("timeout")
        prepared = []
        for messages in conversations:
            for message in messages:
                if not (isinstance(message, dict) and "role" in message and "content" in message):
                    raise ValueError("When passing chat dicts as input, each dict must have a 'role' and 'content' key.")
            cont = options["pre"].get("continue_final_message")
            if cont is None:
                cont = messages[-1]["role"] == "assistant"
            template = {"add_generation_prompt": not cont, **options["pre"].get("template", {})}  # (the caller's wins, as in transformers)
            rendered = self.processor.apply_chat_template(messages, continue_final_message=cont, **template)
            sources = images_in_messages(messages)
            loaded = [_load_image(source, timeout, self.processor.image_sources) for source in sources]
            bos = self.processor.tokenizer.bos_token
            add_special = not (bos is not None and rendered.startswith(bos))
            prepared.append(_Item(messages, rendered, loaded, add_special, cont))
        results = self._run(prepared, options)
        outputs = [self._records([item], [answers], options) for item, answers in zip(prepared, results)]
        return outputs[0] if single else outputs

    # ----------------------------------------------------------------------------------------------
    # Prompt strings

    def _prompts(self, images: Any, text: Any, options: dict) -> list:
        """One input of prompt string(s) (+ images): one batch, one record per prompt, as transformers."""
        items = self._prompt_items(images, text, options)
        results = self._run(items, options, batch=True)
        return self._records(items, results, options)

    def _prompt_items(self, images: Any, text: Any, options: dict) -> list[_Item]:
        """Prompt string(s) and their images (loaded) as items, each prompt with as many images as it holds image
        tokens, in order."""
        if text is None:
            raise ValueError("You must provide text for this pipeline.")
        if options.get("call_template"):  # (transformers hands them to the processor, whose settings a bundle fixes)
            raise TypeError(f"unsupported argument(s) for prompt strings: {', '.join(sorted(options['call_template']))} (chat template variables apply to chats)")
        timeout = options["pre"].get("timeout")
        texts = [text] if isinstance(text, str) else list(text)
        flat = flatten_images(images) if images is not None else []
        loaded = [_load_image(source, timeout, self.processor.image_sources, reload_pil=True) for source in flat]
        counts = [prompt.count(self.processor.image_token) for prompt in texts]
        if sum(counts) != len(loaded):
            raise ValueError(
                f"the prompts hold {sum(counts)} {self.processor.image_token} token(s) but {len(loaded)} image(s) were given; "
                f"each {self.processor.image_token} in the text takes one image, in order"
            )
        items, start = [], 0
        for prompt, count in zip(texts, counts):
            items.append(_Item(prompt, prompt, loaded[start : start + count], True, False))
            start += count
        return items

    # ----------------------------------------------------------------------------------------------
    # Generation and outputs

    def _run(self, items: list[_Item], options: dict, batch: bool = False) -> list[list[GenerationResult]]:
        """Generates for every item: as one batch (`batch`), else in groups of `batch_size` (1 by default). Each
        item's answers: one, or `num_return_sequences` of them."""
        size = len(items) if batch else max(1, int(options["pre"].get("batch_size", self.batch_size)))
        # transformers' answers are the rows of one array: a row that ended early is padded to the longest, which
        # its text shows where special tokens are kept (the pad: the call's, else the tokenizer's, as its pipeline
        # passes it, else the generation config's or the first EOS id, as generate picks it).
        post = options["post"]
        show_padding = post.get("skip_special_tokens", True) is False and post.get("return_type") != "tensors"
        pad = options["generate"].get("pad_token_id", self.processor.tokenizer.pad_token_id)
        if show_padding and pad is None:
            pad = self.model._special_ids(self.model.settings(**options["generate"]))[1]
        results = []
        for start in range(0, len(items), size):
            group = items[start : start + size]
            prompts = [self._runtime_prompt(item) for item in group]
            images = [image for item in group for image in item.images] or None
            out = self.model.generate(prompt=prompts, images=images, **options["generate"])
            answers = [answers if isinstance(answers, list) else [answers] for answers in out]
            if show_padding:
                width = max(len(result.token_ids) for row in answers for result in row)
                answers = [[replace(result, token_ids=[*result.token_ids, *[pad] * (width - len(result.token_ids))]) for result in row] for row in answers]
            results.extend(answers)
        return results

    def _runtime_prompt(self, item: _Item) -> str:
        """The text for `Pipeline.generate(prompt=...)`, which tokenizes with the tokenizer's special tokens.

        A chat whose rendered text starts with the BOS is tokenized without them (as transformers' processor
        does): the BOS the tokenizer would add is then cut from the text instead.
        """
        if item.add_special:
            return item.prompt
        added = self.processor.tokenizer.encode("", add_special_tokens=True)
        if not added:
            return item.prompt
        bos, bos_id = self.processor.tokenizer.bos_token, self.processor.tokenizer.bos_token_id
        if bos is not None and added == [bos_id] and item.prompt.startswith(bos):
            return item.prompt[len(bos) :]
        raise NotImplementedError(f"this tokenizer adds {added} around a prompt; a chat template starting with {bos!r} cannot be run through it")

    def _prompt_ids(self, item: _Item) -> list[int]:
        """The prompt's token ids as the processor makes them: each image token expanded, then tokenized."""
        sizes = image_sizes(item.images)
        (expanded,) = self.processor.expand_image_tokens([item.prompt], sizes)
        return self.processor.tokenizer.encode(expanded, add_special_tokens=item.add_special)

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        return self.processor.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=clean_up)

    def _records(self, items: list[_Item], results: list[list[GenerationResult]], options: dict) -> list[dict[str, Any]]:
        """One record per answer, each item's answers in order (as transformers' `postprocess` lists them)."""
        post = options["post"]
        return_type = post.get("return_type", "full_text")
        skip = post.get("skip_special_tokens", True)
        clean_up = post.get("clean_up_tokenization_spaces")
        records = []
        for item, answers in zip(items, results):
            prompt_ids = self._prompt_ids(item)
            decoded_input = self._decode(prompt_ids, skip, clean_up) if return_type != "tensors" else ""
            for result in answers:
                if return_type == "tensors":
                    records.append({"input_text": item.input_text, "generated_token_ids": np.array(prompt_ids + list(result.token_ids), dtype=np.int64)})
                    continue
                generated = self._decode(prompt_ids + list(result.token_ids), skip, clean_up)
                # transformers: drop the decoded prompt from the start (up to 2 leading characters allowed).
                at = generated.find(decoded_input)
                if 0 <= at <= 2:
                    generated = generated[at + len(decoded_input) :]
                if return_type == "full_text":
                    generated = self._full_text(item, generated)
                records.append({"input_text": item.input_text, "generated_text": generated})
        return records

    @staticmethod
    def _full_text(item: _Item, generated: str) -> Any:
        if isinstance(item.input_text, str):
            return item.input_text + generated
        messages = item.input_text
        if item.continue_final:
            content = messages[-1]["content"]
            if isinstance(content, str):
                content += generated
            else:
                new_text = dict(content[-1].items())
                new_text["text"] += generated
                content = content[:-1] + [new_text]
            return list(messages)[:-1] + [{"role": messages[-1]["role"], "content": content}]
        return list(messages) + [{"role": "assistant", "content": generated}]


@dataclass
class _Item:
    """One input of a call: what it reports as `input_text`, and how it is generated from."""

    input_text: Any  # the chat or prompt string, as given
    prompt: str  # the text the processor tokenizes (a chat rendered with its template)
    images: list  # its loaded images, in order
    add_special: bool  # whether the tokenizer adds its special tokens (not where the template wrote a BOS)
    continue_final: bool  # a chat ending in an assistant message: continued, not answered


_NOTHING = object()  # (an iterator's end: None may be an item)


# A chat template call's own options, which the pipeline sets (transformers' passes them on and fails later)
_RENDERING_OPTIONS = {"tokenize", "return_dict", "return_assistant_tokens_mask", "truncation", "pixel_values"}


def _is_text(arg: Any) -> bool:
    """A prompt string, or a non-empty list or tuple of them (a list may hold tuples: each one batch)."""
    return isinstance(arg, str) or isinstance(arg, (list, tuple)) and len(arg) > 0 and all(
        isinstance(item, str) or isinstance(arg, list) and isinstance(item, tuple) and _is_text(item) for item in arg
    )


def _is_chat(arg: Any) -> bool:
    return isinstance(arg, (list, tuple)) and len(arg) > 0 and isinstance(arg[0], (list, tuple, dict))


def _load_image(source: Any, timeout: float | None, sources: Collection[str], reload_pil: bool = False) -> Any:
    """`load_image`, with `timeout` (when given) for http(s) URLs, of the kinds of source the pipeline takes
    (`sources`, its `image_sources`). `reload_pil`: a PIL image too is EXIF-rotated and
    converted with `convert("RGB")` (transparency dropped, not composited on white), as transformers' pipeline
    reloads the images that come with prompt strings (those in chat messages it passes on as given)."""
    if reload_pil and isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source).convert("RGB")
    return load_image(source, timeout=URL_TIMEOUT_S if timeout is None else timeout, sources=sources)
