"""`BundleTokenizer`: the bundle's `tokenizers.Tokenizer` with the names a transformers user reaches for
(`tokenizer("text")`, `encode`, `decode`, `eos_token_id`, `convert_tokens_to_ids`, ...), as `processor.tokenizer`.

It calls what transformers 5's tokenizers-backed tokenizer calls (`TokenizersBackend`: the same tokenizer.json), so
ids and texts are the same; `backend_tokenizer` is the `tokenizers.Tokenizer` itself, as in transformers, and any
other attribute is read from it (`token_to_id`, `encode_batch`, `model`, ...).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..bundle.manifest import Manifest

# transformers' named special tokens, in its order (`SPECIAL_TOKENS_ATTRIBUTES`); a model's own (`image_token`) follow.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' `model_max_length` where a tokenizer sets none
LARGE_INTEGER = int(1e20)  # a `model_max_length` above this bounds nothing (transformers' rule)
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class BundleTokenizer:
    """A bundle's tokenizer, called as transformers' tokenizer is (text in, `input_ids` and `attention_mask` out)."""

    # The special tokens (set from the bundle's tokenizer config, else its manifest), None where there is none; a
    # model's own named ones (`image_token`, `image_token_id`) are attributes too, as in transformers.
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None
    unk_token: str | None
    unk_token_id: int | None
    is_fast = True  # (transformers' name for a tokenizer backed by tokenizers' Tokenizer)

    def __init__(self, backend: Tokenizer, manifest: Manifest, tokenizer_config: dict[str, Any] | None = None, name_or_path: str = ""):
        """`tokenizer_config`: the bundle's tokenizer_config.json (its sides, `model_max_length`, the tokenizer's own chat
        template, `*_token` entries and extra special tokens); `name_or_path`: where it was loaded from."""
        self.backend_tokenizer = backend
        config = tokenizer_config or {}
        tokens = manifest.tokens
        self.name_or_path = name_or_path
        self.padding_side = tokens.padding_side
        self.truncation_side = config["truncation_side"] if config.get("truncation_side") in ("left", "right") else "right"
        self.model_max_length = int(config.get("model_max_length") or VERY_LARGE_INTEGER)
        # The tokenizer's own template, where the checkpoint's tokenizer has one (the bundle's, for images, is the processor's).
        self.chat_template = _default_template(config.get("chat_template"))
        self.clean_up_tokenization_spaces = tokens.clean_up_tokenization_spaces
        named = {name: _content(value) for name, value in config.items() if name.endswith("_token") and _content(value)}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, dict):  # ({"image_token": "<image>"}: named tokens of the model's own, as transformers 5 reads them)
            named.update({name: _content(value) for name, value in extra.items() if _content(value) and name not in named})
            extra = []
        self.extra_special_tokens = [token for token in (_content(value) for value in extra) if token]
        # Each special token as the config names it, else (a bundle without one) from the manifest's ids.
        fallback = {"bos_token": tokens.bos_token_id, "eos_token": tokens.eos_token_ids[0] if tokens.eos_token_ids else None, "pad_token": tokens.pad_token_id}
        special = {}
        for name in (*_NAMED_TOKENS, *(name for name in named if name not in _NAMED_TOKENS)):
            index = fallback.get(name)
            token = named.get(name) or (backend.id_to_token(index) if index is not None else None)
            special[name] = token
            setattr(self, name, token)
            setattr(self, f"{name}_id", backend.token_to_id(token) if token is not None else None)
        self.special_tokens_map = {name: token for name, token in special.items() if token is not None}
        self.all_special_tokens = list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def padding_side(self) -> str:
        """Where `padding=True` pads: "left" or "right" (settable, as in transformers)."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        self._padding_side = _side("padding_side", side)

    @property
    def truncation_side(self) -> str:
        """Where truncation cuts: "left" or "right" (settable)."""
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, side: str) -> None:
        self._truncation_side = _side("truncation_side", side)

    def __getattr__(self, name: str) -> Any:  # (only for names not found above: the backend's own)
        if name == "backend_tokenizer" or name.startswith("_"):  # (not set yet: never recurse)
            raise AttributeError(name)
        try:
            return getattr(self.backend_tokenizer, name)
        except AttributeError:
            raise AttributeError(
                f"ortllava's BundleTokenizer has no attribute {name!r} (nor has its backend_tokenizer, a tokenizers.Tokenizer): "
                "it implements the transformers tokenizer calls that inference uses"
            ) from None

    # -- text -> ids ----------------------------------------------------------------------------------

    def __call__(
        self, text: str | Sequence[str], text_pair: Any = None, *, add_special_tokens: bool = True, padding: bool | str = False,
        padding_side: str | None = None, max_length: int | None = None, truncation: bool | str | None = None,
        pad_to_multiple_of: int | None = None, return_tensors: str | None = None, return_attention_mask: bool = True,
    ) -> BatchFeature:
        """`input_ids` and `attention_mask`: lists for one text (lists of lists for several), as transformers gives
        them without `return_tensors`; `[B, T]` int64 arrays with `return_tensors="np"` (the texts must then be as
        long, or padded: `padding=True` to the longest, "max_length" to `max_length`, on `padding_side`, the length
        rounded up to a multiple of `pad_to_multiple_of` where given). `truncation` (True, "longest_first" or
        "only_first") cuts each text to `max_length` tokens on `truncation_side`, and so does a `max_length` given
        without padding or truncation, as in transformers. Pairs of texts (`text_pair`) are not taken."""
        check_return_tensors(return_tensors)
        if text_pair is not None:
            raise ValueError("text_pair: ortllava's tokenizer encodes single texts, not pairs (a second positional argument is a pair)")
        single = isinstance(text, str)
        if not single and not isinstance(text, (list, tuple)):
            raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        padding, max_length = self.padding_and_length(padding, truncation, max_length, pad_to_multiple_of)
        if truncates(truncation, padding, max_length):  # (the special tokens are added after the cut, so that they stay)
            encodings = self.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            ids = [self.truncated(encoding, max_length, add_special_tokens) for encoding in encodings]
        else:
            ids = [encoding.ids for encoding in self.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if padding in (False, "do_not_pad") and return_tensors is None:
            data = {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        elif padding == "max_length" and return_tensors is None:  # (lists: a row longer than max_length stays so, as in transformers)
            target = -(-max_length // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of else max_length
            side = padding_side or self.padding_side
            rows = [pad_ids([row], self.pad_token_id, side, "max_length", max(len(row), target)) for row in ids]
            data = {key: [padded[key][0].tolist() for padded in rows] for key in ("input_ids", "attention_mask")}
        else:
            data = pad_ids(ids, self.pad_token_id, padding_side or self.padding_side, padding, max_length, pad_to_multiple_of)
            if return_tensors is None:
                data = {key: value.tolist() for key, value in data.items()}
        if single and return_tensors is None:
            data = {key: value[0] for key, value in data.items()}
        if not return_attention_mask:
            del data["attention_mask"]
        return BatchFeature(data)

    def padding_and_length(
        self, padding: bool | str, truncation: bool | str | None, max_length: int | None, pad_to_multiple_of: int | None = None,
    ) -> tuple[bool | str, int | None]:
        """(padding, max_length) as transformers settles them where no `max_length` is given: padding="max_length"
        and truncation go to `model_max_length`, where the tokenizer sets one (where not, padding="max_length" pads
        nothing and truncation cuts nothing); a ValueError, in transformers' words, where a truncated and padded
        length is no multiple of `pad_to_multiple_of`."""
        _check_multiple(pad_to_multiple_of)
        cuts = truncation not in (None, False, "do_not_truncate")
        if max_length is None and (padding == "max_length" or cuts):
            if self.model_max_length > LARGE_INTEGER:
                padding = False if padding == "max_length" else padding
            else:
                max_length = self.model_max_length
        if cuts and padding not in (False, "do_not_pad") and pad_to_multiple_of and max_length is not None and max_length % pad_to_multiple_of:
            raise ValueError(
                f"Truncation and padding are both activated but truncation length ({max_length}) is not a multiple of "
                f"pad_to_multiple_of ({pad_to_multiple_of})."
            )
        return padding, max_length

    def truncated(self, encoding: Encoding, max_length: int, add_special_tokens: bool, side: str | None = None) -> list[int]:
        """The ids of `encoding` (made without special tokens) cut on `side` (default: `truncation_side`) so that, with
        the special tokens added after, they are at most `max_length`, as the tokenizer's own truncation does (a BOS
        is never cut)."""
        room = max(max_length - (self.backend_tokenizer.num_special_tokens_to_add(False) if add_special_tokens else 0), 0)
        encoding.truncate(room, direction=side or self.truncation_side)
        return self.backend_tokenizer.post_process(encoding, add_special_tokens=add_special_tokens).ids

    def encode(
        self, text: str, text_pair: Any = None, add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
        max_length: int | None = None, padding_side: str | None = None, return_tensors: str | None = None,
    ) -> list[int] | np.ndarray:
        """The ids of one text, as transformers' `encode`: a list, or with `return_tensors="np"` a `[1, T]` array."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one text (a string), got {type(text).__name__}: tokenizer(texts) encodes several")
        if text_pair is None and padding is False and truncation is None and max_length is None and return_tensors is None:
            return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids  # (the common call, direct)
        return self(
            text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation, max_length=max_length,
            padding_side=padding_side, return_tensors=return_tensors,
        )["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The tokens of `text` as strings (the vocabulary's spelling: `▁the`, `Ġthe`), as transformers' `tokenize`."""
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Token strings -> text, through the tokenizer's decoder."""
        decoder = self.backend_tokenizer.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def apply_chat_template(
        self, conversation: list[dict] | list[list[dict]], tools: list[dict] | None = None, documents: list[dict] | None = None,
        chat_template: str | None = None, add_generation_prompt: bool = False, continue_final_message: bool | str = False,
        tokenize: bool = True, sanitize_control_tokens: bool = False, padding: bool | str = False, truncation: bool = False,
        max_length: int | None = None, return_tensors: str | None = None, return_dict: bool = True, return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | np.ndarray | BatchFeature:
        """The chat template (`chat_template`, else the tokenizer's own) rendered and, by default, tokenized,
        as transformers 5's tokenizer does (`return_dict=True`: `input_ids` and `attention_mask`; the messages may be
        dataclasses or pydantic models, and keys set to None are dropped, as there). `kwargs` are the
        template's variables; `tokenizer_kwargs` go to the tokenizer's call. For chats with images:
        `processor.apply_chat_template`."""
        from . import chat_template as templates  # (jinja2: imported when a template is used)
        from .inputs import chat_messages, is_chat_batch

        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                "this bundle's tokenizer has no chat template of its own (transformers' refuses such a call too; a bundle "
                "exported before ortllava kept the tokenizer's template has none either: re-export it): pass chat_template=..., "
                "or use processor.apply_chat_template (the model's template, which takes images as well)"
            )
        batched = is_chat_batch(conversation)
        # As transformers' tokenizer takes them: message objects as dicts, keys set to None dropped (no image blocks mapped).
        conversations = [chat_messages(chat) for chat in (conversation if batched else [conversation])]
        templates.check_options(conversations, add_generation_prompt, continue_final_message, return_assistant_tokens_mask, sanitize_control_tokens)
        variables = {**self.special_tokens_map, **kwargs}
        texts = [templates.render(template, chat, add_generation_prompt, continue_final_message, tools, documents, **variables) for chat in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        # (the rendered text holds the BOS where the template writes it: no special tokens are added, as transformers)
        options = {"add_special_tokens": False, "padding": padding, "truncation": truncation, "max_length": max_length, **(tokenizer_kwargs or {})}
        out = self(texts if batched else texts[0], return_tensors=return_tensors, **options)
        return out if return_dict else out["input_ids"]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """A token's id (None where the vocabulary has no such token: transformers gives the unknown token's, if any)."""
        if isinstance(tokens, str):
            index = self.backend_tokenizer.token_to_id(tokens)
            return index if index is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | None | list[str | None]:
        if isinstance(ids, (int, np.integer)):
            return self.backend_tokenizer.id_to_token(int(ids))
        skipped = set(self.all_special_ids) if skip_special_tokens else ()
        return [self.backend_tokenizer.id_to_token(int(index)) for index in ids if int(index) not in skipped]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size, without added tokens (transformers' `vocab_size`; `len()` counts them)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """The ids of the tokens tokenizer_config.json names (bos, eos, unk, pad, image, and any extra ones), as transformers'."""
        ids = (self.backend_tokenizer.token_to_id(token) for token in self.all_special_tokens)
        return [index for index in ids if index is not None]

    # -- ids -> text ----------------------------------------------------------------------------------

    def decode(self, ids: int | Sequence[int] | np.ndarray, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """The text of `ids`, as transformers' tokenizer `decode`: one id or a sequence gives a string; a batch (a
        list of lists, a 2-D array or tensor) a list of strings. Special tokens are kept unless
        `skip_special_tokens`. `clean_up_tokenization_spaces` (None: the tokenizer's setting) is never applied to a
        BPE tokenizer, as in transformers 5 (it would remove real spaces before punctuation)."""
        ids = as_lists(ids)
        if isinstance(ids, list) and ids and isinstance(ids[0], list):  # a batch
            return [self._decode_one(row, skip_special_tokens, clean_up_tokenization_spaces) for row in ids]
        return self._decode_one(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """`decode` of a batch: a list of strings (one sequence gives a list of its one string, as transformers)."""
        sequences = as_lists(sequences)
        if isinstance(sequences, list) and not sequences:
            return []
        texts = self.decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)
        return [texts] if isinstance(texts, str) else texts

    def _decode_one(self, ids: int | list[int], skip_special_tokens: bool, clean_up_tokenization_spaces: bool | None) -> str:
        ids = [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean and type(self.backend_tokenizer.model).__name__ != "BPE" else text


class BatchFeature(dict):
    """The tokenizer's and the processor's outputs: a dict whose entries are also attributes (`inputs.input_ids`),
    as transformers' `BatchEncoding` and `BatchFeature`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def pad_ids(
    ids: list[list[int]], pad_id: int | None, side: str, padding: bool | str = True, max_length: int | None = None, multiple: int | None = None,
) -> dict[str, np.ndarray]:
    """Ragged token ids -> `input_ids` and `attention_mask` `[B, T]` int64: `padding` True or "longest" pads to the
    longest row, "max_length" to `max_length` (a row longer than it stays so, as in transformers, so that rows of
    other lengths cannot make one array: an error, where transformers returns an object array of ragged rows, which no
    model takes), False or "do_not_pad" only checks the rows are as long; on `side` ("left" or "right"), with `pad_id`
    (0 where the tokenizer has none; the mask leaves it out).
    `multiple` (transformers' `pad_to_multiple_of`): a padded length is rounded up to a multiple of it."""
    if padding not in (True, False, "longest", "max_length", "do_not_pad"):
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    _check_multiple(multiple)
    side = _side("padding_side", side)
    longest = max(len(row) for row in ids)
    if padding in (False, "do_not_pad") and any(len(row) != longest for row in ids):
        raise ValueError("the prompts tokenize to different lengths: pass padding=True to pad them")
    if padding == "max_length":
        target = -(-max_length // multiple) * multiple if multiple else max_length
        if longest > target and any(len(row) != longest for row in ids):
            raise ValueError(
                f"padding='max_length' pads the prompts to max_length={max_length} tokens, but one is {longest} tokens long and "
                "is not cut, so the rows cannot make one array: pass truncation=True to cut them to max_length, or "
                "padding=True to pad them to the longest"
            )
        longest = max(longest, target)
    elif multiple and padding not in (False, "do_not_pad"):
        longest = -(-longest // multiple) * multiple
    input_ids = np.full((len(ids), longest), pad_id if pad_id is not None else 0, dtype=np.int64)
    mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, tokens in enumerate(ids):
        span = slice(longest - len(tokens), longest) if side == "left" else slice(0, len(tokens))
        input_ids[row, span] = tokens
        mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def truncates(truncation: bool | str | None, padding: bool | str, max_length: int | None) -> bool:
    """Whether a tokenizer or processor call cuts its texts to `max_length`, by transformers' rule: as asked, and
    where unset, when a `max_length` comes without padding."""
    if max_length is not None and (not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length < 1):
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")
    if truncation in (False, "do_not_truncate"):
        return False
    if truncation is None:
        return max_length is not None and padding in (False, "do_not_pad")
    if truncation in (True, "longest_first", "only_first"):
        return max_length is not None  # (without one, `BundleTokenizer.padding_and_length` found no model_max_length)
    raise ValueError(f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', got {truncation!r}")


def as_lists(ids: Any) -> Any:
    """Token ids as Python ints and lists, from numpy arrays, tensors (anything with `tolist`) or sequences."""
    first = ids[0] if isinstance(ids, (list, tuple)) and ids else ids
    if hasattr(first, "token_ids") and hasattr(first, "text"):  # (transformers' generate gives ids; ortllava's gives results)
        raise TypeError(
            "these are GenerationResults (what Pipeline.generate returns), not token ids: each result's .text is its answer "
            "already decoded (or decode result.token_ids, the new tokens)"
        )
    if hasattr(ids, "tolist"):
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [as_lists(item) for item in ids] if ids and not isinstance(ids[0], (int, np.integer)) else list(ids)
    return ids


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: the spaces a tokenizer puts before punctuation and contractions."""
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text


def check_return_tensors(return_tensors: Any) -> None:
    """A ValueError for a `return_tensors` other than None or "np": ortllava's outputs are numpy arrays either way."""
    if return_tensors not in (None, "np"):
        raise ValueError(f"return_tensors={return_tensors!r}: ortllava returns numpy arrays (None or 'np')")


def _check_multiple(multiple: Any) -> None:
    if multiple is not None and (not isinstance(multiple, (int, np.integer)) or isinstance(multiple, bool) or multiple < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive integer, got {multiple!r}")


def _side(name: str, side: Any) -> str:
    """A padding or truncation side, checked: "left" or "right"."""
    if side not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
    return side


def _default_template(template: Any) -> str | None:
    """A tokenizer config's chat template: a string, or of a list of named ones (`[{"name": ..., "template": ...}]`)
    the one named "default"."""
    if isinstance(template, list):
        template = next((entry.get("template") for entry in template if isinstance(entry, dict) and entry.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _content(value: Any) -> str | None:
    """A special token as tokenizer_config.json names it: a string, or an AddedToken dict with its "content"."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None
