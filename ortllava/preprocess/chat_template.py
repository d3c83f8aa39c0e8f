"""Chat templates rendered as transformers renders them: same jinja environment, extensions and globals.

transformers compiles templates in an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
with the `loopcontrols` extension, a `{% generation %}` block tag, its own `tojson`, and the globals
`raise_exception`, `strftime_now`, `dict` and `namespace`. Messages reach the template as plain data:
images and other objects inside them become a placeholder string such as "<Image>".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (its `raise_exception`) or failed to render."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant tokens; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore names as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore names, got {name!r}")


class _Dict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def plain_data(value: Any) -> Any:
    """What a template may see: JSON-like data; any other object becomes "<TypeName>" (as transformers does)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (a str Enum) stripped back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_data(item) for item in value)
    if isinstance(value, np.generic):
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # a pydantic model
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # marks where a continued final message ends (transformers' tag)


@lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """The names a template reads from outside (messages, add_generation_prompt, its own options, ...)."""
    return frozenset(jinja2.meta.find_undeclared_variables(compile_template(template).environment.parse(template)))


def check_options(
    conversations: list[list[dict]], add_generation_prompt: bool, continue_final_message: bool | str,
    return_assistant_tokens_mask: bool = False, sanitize_control_tokens: bool = False,
) -> None:
    """A ValueError for what `apply_chat_template` (the processor's or the tokenizer's) cannot render: an empty chat,
    both ways of ending one, or transformers' options that ortllava does not implement."""
    if any(not chat for chat in conversations):
        raise ValueError("a chat to render must hold at least one message")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt exclude each other: continue the final message, or add a new one's header")
    for name, asked in (("return_assistant_tokens_mask", return_assistant_tokens_mask), ("sanitize_control_tokens", sanitize_control_tokens)):
        if asked:
            raise ValueError(f"{name}=True is not implemented by ortllava")


def render(
    template: str, messages: list[dict], add_generation_prompt: bool = False, continue_final_message: bool | str = False,
    tools: list[dict] | None = None, documents: list[dict] | None = None, **variables: Any,
) -> str:
    """Renders one conversation as transformers' `render_jinja_template` does. `variables` are what transformers
    passes too: special tokens and the caller's template options. `continue_final_message` (True: the final
    message's "content", or the name of another field) ends the text inside the final message, for the model
    to go on with it; `tools` are JSON schemas, `documents` dicts."""
    if tools is not None and not all(isinstance(tool, Mapping) for tool in tools):
        raise TypeError("tools must be JSON schemas (dicts); ortllava does not convert functions to schemas")
    if documents is not None and not all(isinstance(document, Mapping) for document in documents):
        raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
    chat = plain_data(list(messages))
    for message in chat:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, got {message!r}")
    chat = _alias_reasoning(chat)
    final_text = _mark_final_message(chat, template, continue_final_message) if continue_final_message else None

    def rendered_with(messages: list[dict]) -> str:
        return compile_template(template).render(
            messages=messages, tools=plain_data(tools), documents=plain_data(documents), add_generation_prompt=add_generation_prompt,
            **plain_data(variables),
        )

    # A template that reads each message's content as a list of parts (the llava-hf ones) refuses OpenAI's string
    # content, or an assistant turn without any (a tool call's), or renders a string's text as nothing: the chat is
    # then rendered with that content given as parts (where transformers' would fail, or leave the text out). Only
    # where the parts show what the strings lost: a template that leaves a message out whatever its form (one that
    # skips the system message) renders the strings, as transformers does.
    plain = "type" in template and any(not isinstance(message.get("content"), list) for message in chat)  # (one that reads parts)
    try:
        try:
            rendered = rendered_with(chat)
        except jinja2.exceptions.TemplateError:
            if not plain:
                raise
            rendered = rendered_with([_as_parts(message) for message in chat])
        else:
            as_parts = _parts_for_lost_text(rendered_with, chat) if plain else None
            if as_parts is not None:
                rendered = rendered_with(as_parts)
    except jinja2.exceptions.TemplateError as error:
        strings = [str(m.get("role")) for m in chat if isinstance(m.get("content"), str)]
        hint = (  # (the llava-hf templates read each message's content as a list of parts, as transformers' do)
            f"; the {', '.join(dict.fromkeys(strings))} message(s) give their content as a string, which this template may not "
            'read: give a list of parts, [{"type": "text", "text": ...}]' if strings and "'str object'" in str(error) else ""
        )
        raise ChatTemplateError(f"the chat template refused the conversation: {error}{hint}") from error
    return rendered if final_text is None else _cut_at_mark(rendered, final_text)


def _parts_for_lost_text(rendered_with: Callable[[list[dict]], str], chat: list[dict]) -> list[dict] | None:
    """`chat` with the string content the template renders as nothing given as parts (and a missing content as an
    empty text part), where those parts show some of it (a template that iterates parts reads a string as characters,
    and renders none of them); None where no text is lost, or where the parts do not show it either (the template
    leaves the message out, whatever its content: it renders the strings). Each string content is given as a mark of
    its own, so that the same words elsewhere in the prompt are not taken for it; only the lost ones become parts, so
    that a string the template does show is not rendered as a list's repr."""
    marks = {index: f"ORTLLAVA{index}CONTENT" for index, message in enumerate(chat) if isinstance(message.get("content"), str)}
    marked = [{**message, "content": marks[index]} if index in marks else message for index, message in enumerate(chat)]
    try:
        rendered = rendered_with(marked)
    except jinja2.exceptions.TemplateError:  # (one that reads the text itself, and refuses a mark: it renders strings)
        return None
    lost = {index for index, mark in marks.items() if mark not in rendered}
    if not lost:
        return None

    def as_parts(messages: list[dict]) -> list[dict]:  # (the lost ones, and those without content; the rest as given)
        return [_as_parts(m) if index in lost or m.get("content") is None else m for index, m in enumerate(messages)]

    try:
        shown = rendered_with(as_parts(marked))
    except jinja2.exceptions.TemplateError:
        return None
    return as_parts(chat) if any(marks[index] in shown for index in lost) else None


def _as_parts(message: dict) -> dict:
    """A message whose content is a string, or missing (an empty text), with it as a list of parts (`[{"type": "text", ...}]`)."""
    content = message.get("content")
    if isinstance(content, list):
        return message
    return {**message, "content": [{"type": "text", "text": "" if content is None else str(content)}]}


def _mark_final_message(chat: list[dict], template: str, field: bool | str) -> str:
    """Appends the continue tag to the final message's text (in place, on the template's copy); returns that text."""
    if not chat:
        raise ValueError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message is set but the final message has no "{field}" to continue')
    fields = [name for name in _REASONING_FIELDS if chat[-1].get(name) == final] if field in _REASONING_FIELDS else [field]
    if not any(name in template for name in fields):
        raise ValueError(f'continue_final_message is set to "{field}", which this chat template does not read')
    if not isinstance(final, (str, list, tuple)):
        raise ValueError(f"continue_final_message is set but the final message's {field} is a {type(final).__name__}, not text")
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                text, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text to continue")
    for name in fields:
        chat[-1][name] = chat[-1][name] + _CONTINUE_TAG
    return final


def _cut_at_mark(rendered: str, final_text: str) -> str:
    """The rendered text up to the continue tag (and the spaces the template trimmed before it)."""
    tag = _CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the chat template drops (part of) the final message")
    at = rendered.rindex(tag)
    return rendered[:at] if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()
