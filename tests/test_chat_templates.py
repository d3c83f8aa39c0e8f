"""Chat templates rendered as transformers renders them, and `apply_chat_template`'s arguments."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoProcessor

import ortllava
from ortllava.preprocess.chat_template import ChatTemplateError
from ortllava_export.tiny import CHATML_TEMPLATE, MISTRAL_TEMPLATE, VICUNA_TEMPLATE

from conftest import random_image

IMAGE = random_image(64, 48)
CONVERSATIONS = {
    "single": [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is this?"}]}],
    "system and multi-turn with earlier image": [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "image", "url": "https://example.invalid/a.png"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
    ],
    "string content": [{"role": "user", "content": "Plain string content"}],
}
TEMPLATES = {"mistral": MISTRAL_TEMPLATE, "vicuna (generation block)": VICUNA_TEMPLATE, "chatml": CHATML_TEMPLATE}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_renders_as_transformers(mistral, template, conversation, add_generation_prompt):
    """As transformers renders it; string content, whose text the vicuna template (reading parts) leaves out there, as
    transformers renders the same content given as parts."""
    hf = AutoProcessor.from_pretrained(mistral.checkpoint)
    pipe = ortllava.load(mistral.bundle, provider="cpu", verify=False)
    messages = CONVERSATIONS[conversation]
    if template == "vicuna (generation block)" and conversation == "string content":
        dropped = hf.apply_chat_template(messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt)
        assert messages[0]["content"] not in dropped  # (the case: transformers renders the message without its text)
        messages_as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]} for m in messages]
        want = hf.apply_chat_template(messages_as_parts, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt)
        assert pipe.processor.apply_chat_template(messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt) == want
        return
    want = hf.apply_chat_template(messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt)
    got = pipe.processor.apply_chat_template(messages, chat_template=TEMPLATES[template], add_generation_prompt=add_generation_prompt)
    assert got == want


def test_template_globals(mistral):
    pipe = ortllava.load(mistral.bundle, provider="cpu", verify=False)
    with pytest.raises(ChatTemplateError, match="Only system, user and assistant"):
        pipe.processor.apply_chat_template([{"role": "tool", "content": [{"type": "text", "text": "x"}]}])
    # OpenAI's forms that a template reading parts refuses (in transformers too): string content, an assistant turn
    # without content (a tool call's), rendered as the same content given as parts.
    hf = AutoProcessor.from_pretrained(mistral.checkpoint)
    openai = [{"role": "system", "content": "be terse"}, {"role": "user", "content": [{"type": "text", "text": "x"}]},
              {"role": "assistant", "content": None, "tool_calls": []}, {"role": "user", "content": "y"}]
    as_parts = [{"role": "system", "content": [{"type": "text", "text": "be terse"}]}, openai[1], {"role": "assistant", "content": [{"type": "text", "text": ""}]},
                {"role": "user", "content": [{"type": "text", "text": "y"}]}]
    with pytest.raises(Exception):
        hf.apply_chat_template(openai)
    assert pipe.processor.apply_chat_template(openai, add_generation_prompt=True) == hf.apply_chat_template(as_parts, add_generation_prompt=True)
    # A template that reads parts leaves a string's text out even where the same words are elsewhere in the prompt.
    repeated = [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": [{"type": "text", "text": "again"}]}]
    repeated_parts = [repeated[0], {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}, repeated[2]]
    vicuna = TEMPLATES["vicuna (generation block)"]
    assert "hello " not in hf.apply_chat_template(repeated, chat_template=vicuna).replace("Say hello", "")  # (the case: the answer is left out there)
    assert pipe.processor.apply_chat_template(repeated, chat_template=vicuna) == hf.apply_chat_template(repeated_parts, chat_template=vicuna)
    template = "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ strftime_now('%Y') | length }}|{{ messages | tojson }}"
    rendered = pipe.processor.apply_chat_template([{"role": "user", "content": "é"}], chat_template=template)
    assert rendered == hf.apply_chat_template([{"role": "user", "content": "é"}], chat_template=template) == '<s>1|4|[{"role": "user", "content": "é"}]'


def test_apply_chat_template_arguments_as_transformers(mistral):
    """continue_final_message, OpenAI image_url blocks, keys set to None, tools, and keyword arguments split
    between the template and the processor's call, as transformers' `ProcessorMixin.apply_chat_template`."""
    hf = AutoProcessor.from_pretrained(mistral.checkpoint)
    ours = ortllava.load(mistral.bundle, provider="cpu", verify=False).processor
    prefilled = [*CONVERSATIONS["single"], {"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    assert ours.apply_chat_template(prefilled, continue_final_message=True) == hf.apply_chat_template(prefilled, continue_final_message=True)
    assert ours.apply_chat_template(prefilled, continue_final_message=True).endswith("It is a")
    with pytest.raises(ValueError, match="exclude each other"):
        ours.apply_chat_template(prefilled, continue_final_message=True, add_generation_prompt=True)
    openai = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "Hi"}], "name": None},
    ]
    assert ours.apply_chat_template(openai, add_generation_prompt=True) == hf.apply_chat_template(openai, add_generation_prompt=True)
    assert ours.apply_chat_template(openai).count("<image>") == 1
    # OpenAI's Responses forms render as their Chat Completions twins; a part the template would leave out is refused.
    responses = [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}, {"type": "input_text", "text": "Hi"}]}]
    assert ours.apply_chat_template(responses, add_generation_prompt=True) == hf.apply_chat_template(openai, add_generation_prompt=True)
    history = [*responses, {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}, {"role": "user", "content": [{"type": "input_text", "text": "More"}]}]
    as_parts = [openai[0], {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}, {"role": "user", "content": [{"type": "text", "text": "More"}]}]
    assert ours.apply_chat_template(history) == hf.apply_chat_template(as_parts)
    with pytest.raises(ValueError, match="an input_image part with a file_id \\('file-1'\\): give the image itself"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}])
    for part, named in (({"type": "imag_url", "image_url": {"url": "x"}}, "of type 'imag_url'"), ({"text": "Hi"}, "without a 'type' \\(its keys: 'text'\\)"),
                        ({"type": "video", "url": "v.mp4"}, "of type 'video'")):
        with pytest.raises(ValueError, match=f"message 0 has a content part {named}, which the chat template would leave out"):
            ours.apply_chat_template([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}])
    template = "{% for m in messages %}{{ m.role }}{% if m.name is defined %}({{ m.name }}){% endif %}{% endfor %}|{{ tools | length }}"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert ours.apply_chat_template(openai, chat_template=template, tools=tools) == hf.apply_chat_template(openai, chat_template=template, tools=tools) == "user|1"
    # A keyword the template does not read goes to the processor's call: here, the batch's padding side.
    batch = [CONVERSATIONS["single"], CONVERSATIONS["string content"]]
    for side in ("left", "right"):
        want = hf.apply_chat_template(batch, tokenize=True, return_dict=True, return_tensors="np", padding=True, padding_side=side)
        got = ours.apply_chat_template(batch, tokenize=True, return_dict=True, return_tensors="np", padding_side=side)
        assert np.array_equal(got["input_ids"], want["input_ids"]) and np.array_equal(got.attention_mask, want["attention_mask"])
    with pytest.raises(ValueError, match="return_tensors='pt': ortllava returns numpy arrays"):
        ours.apply_chat_template(batch, tokenize=True, return_tensors="pt")
    with pytest.raises(ValueError, match="sanitize_control_tokens=True is not implemented"):
        ours.apply_chat_template(batch, tokenize=True, sanitize_control_tokens=True)
    # What the template sees is plain data, as there: a str Enum as its string, a model's dump as a dict.
    import enum

    class Role(str, enum.Enum):
        USER = "user"

    class Dumped:
        def model_dump(self):
            return {"kind": "dumped"}

    rich = [{"role": Role.USER, "content": "Hi", "extra": Dumped()}]
    template = "{% for m in messages %}<{{ m.role }}>{{ m.extra.kind }}{% endfor %}"
    assert ours.apply_chat_template(rich, chat_template=template) == hf.apply_chat_template(rich, chat_template=template) == "<user>dumped"


def test_a_template_that_writes_the_bos_gets_no_second_one(tiny_store):
    """Llama-3's template starts with the BOS: tokenized, it is not added again, even when add_special_tokens=True
    is asked for (as transformers' processor)."""
    llama3 = tiny_store.get("llama3")
    ours = ortllava.load(llama3.bundle, provider="cpu", verify=False).processor
    theirs = AutoProcessor.from_pretrained(llama3.checkpoint)
    chat = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    for processor_kwargs in (None, {"add_special_tokens": True}):
        got = ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, processor_kwargs=processor_kwargs)
        want = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, processor_kwargs=processor_kwargs, return_tensors="np")
        assert np.array_equal(got, want) and int(np.sum(got == ours.tokenizer.bos_token_id)) == 1


def test_a_template_that_leaves_a_message_out_is_rendered_as_transformers(mistral):
    """The parts form is used only where it shows text the strings lost: a template that reads strings and leaves the
    system message out (with "type" elsewhere in it, here in its tools) renders them as transformers does, not the
    user's content (or an empty one's) as a list's repr; one that leaves the system out and reads the user's parts shows the user's string
    as the same content given as parts. The tokenizer's template call renders the same way."""
    hf = AutoProcessor.from_pretrained(mistral.checkpoint)
    ours = ortllava.load(mistral.bundle, provider="cpu", verify=False).processor
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reads_strings = ("{% for m in messages %}{% if m.role != 'system' %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                     "{% for t in tools or [] %}{{ t.type }}{% endfor %}")
    want = hf.apply_chat_template(chat, chat_template=reads_strings)
    assert want == "user: hi\n"
    assert ours.apply_chat_template(chat, chat_template=reads_strings) == want
    assert ours.tokenizer.apply_chat_template(chat, chat_template=reads_strings, tokenize=False) == want
    # An assistant turn without content (a tool call's) stays without: its parts would show no lost text, only a repr.
    tool_call = [*chat, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]
    want = hf.apply_chat_template(tool_call, chat_template=reads_strings)
    assert want == "user: hi\nassistant: \n"
    assert ours.apply_chat_template(tool_call, chat_template=reads_strings) == want
    assert ours.tokenizer.apply_chat_template(tool_call, chat_template=reads_strings, tokenize=False) == want
    reads_parts = ("{% for m in messages %}{% if m.role != 'system' %}{{ m.role }}:{% for c in m.content %}{% if c.type == 'text' %}"
                   "{{ c.text }}{% endif %}{% endfor %}\n{% endif %}{% endfor %}")
    assert "hi" not in hf.apply_chat_template(chat, chat_template=reads_parts)  # (the case: transformers leaves the text out)
    as_parts = [chat[0], {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert ours.apply_chat_template(chat, chat_template=reads_parts) == hf.apply_chat_template(as_parts, chat_template=reads_parts) == "user:hi"


def test_message_objects_and_keys_set_to_none_as_transformers(mistral):
    """transformers 5 takes chat messages, and the parts inside them, as dataclasses or pydantic models (the OpenAI SDK's
    messages: recognised by `model_dump`) and as dicts drops their keys set to None, in its tokenizer's template call as
    in its processor's; an image part given as a dataclass is an image of the chat."""
    import dataclasses

    from ortllava.preprocess.inputs import images_in_messages

    hf = AutoProcessor.from_pretrained(mistral.checkpoint)
    pipe = ortllava.load(mistral.bundle, provider="cpu", verify=False)
    ours = pipe.processor

    @dataclasses.dataclass
    class Message:
        role: str
        content: object
        name: object = None

    @dataclasses.dataclass
    class Part:
        type: str
        image: object = None
        text: object = None

    class SDKMessage:  # (a pydantic model, as far as transformers looks)
        def __init__(self, **fields):
            self.fields = fields

        def model_dump(self):
            return dict(self.fields)

    named = "{% for m in messages %}{{ m['role'] }}:{% if m.name is defined %}({{ m.name }}){% endif %}{{ m['content'] }}|{% endfor %}"
    chat = [{"role": "user", "content": "hi", "name": None}]
    want = hf.tokenizer.apply_chat_template(chat, chat_template=named, tokenize=False)
    assert want == "user:hi|" and ours.tokenizer.apply_chat_template(chat, chat_template=named, tokenize=False) == want
    tokenized = ours.tokenizer.apply_chat_template(chat, chat_template=named)
    assert tokenized["input_ids"] == hf.tokenizer.apply_chat_template(chat, chat_template=named)["input_ids"]
    for objects in ([Message("user", "hi")], [SDKMessage(role="user", content="hi", name=None)]):
        assert ours.tokenizer.apply_chat_template(objects, chat_template=named, tokenize=False) == want
        assert ours.apply_chat_template(objects, chat_template=named) == hf.apply_chat_template(objects, chat_template=named) == want
    image = random_image(60, 40, seed=3)
    with_parts = [Message("user", [Part("image", image=image), Part("text", text="What is this?")])]
    want = hf.apply_chat_template(with_parts, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    got = ours.apply_chat_template(with_parts, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert np.array_equal(got["input_ids"], want["input_ids"]) and np.array_equal(got["pixel_values"], want["pixel_values"])
    assert images_in_messages(with_parts) == [image]
    as_dicts = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    answer = pipe.generate(messages=as_dicts, max_new_tokens=3).token_ids
    assert pipe.generate(messages=with_parts, max_new_tokens=3).token_ids == answer
    assert [token for chunk in pipe.stream(messages=with_parts, max_new_tokens=3) for token in chunk.token_ids] == answer
    assert [r.token_ids for r in pipe.generate(messages=[with_parts, with_parts], max_new_tokens=3)] == [answer] * 2
