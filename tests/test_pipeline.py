"""`ortllava.pipeline("image-text-to-text", ...)` against `transformers.pipeline("image-text-to-text", ...)`.

The same tiny checkpoint on both sides (its bundle for ortllava): the same call must give the same
structure, keys and values (greedy). Images come as PIL images, paths and http URLs (a local server in
a thread); URL fetching keeps `ortllava.preprocess.image_source`'s timeout and size limit.
"""

from __future__ import annotations

import base64
import http.server
import io
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import ortllava
from ortllava import ImageLoadError
from ortllava.preprocess import image_source as image_module

from conftest import random_image, save_png

IMAGE = random_image(320, 240, seed=51)
OTHER = random_image(200, 300, seed=52)


def chat(*content, prefill: str | None = None) -> list[dict]:
    items = [{"type": "text", "text": c} if isinstance(c, str) else c for c in content]
    messages = [{"role": "user", "content": items}]
    if prefill is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": prefill}]})
    return messages


def pil(image) -> dict:
    return {"type": "image", "image": image}


@pytest.fixture(scope="module")
def pipes(mistral):
    hf = transformers.pipeline("image-text-to-text", model=str(mistral.checkpoint))
    ours = ortllava.pipeline("image-text-to-text", model=mistral.bundle, device="cpu")
    return hf, ours


def same(hf_out, our_out):
    """Equal structure, keys and values; token id tensors compared as lists."""
    if isinstance(hf_out, list):
        assert isinstance(our_out, list) and len(our_out) == len(hf_out)
        for a, b in zip(hf_out, our_out):
            same(a, b)
    elif isinstance(hf_out, dict):
        assert isinstance(our_out, dict) and list(our_out) == list(hf_out)
        for key in hf_out:
            same(hf_out[key], our_out[key])
    elif hasattr(hf_out, "tolist") and not isinstance(hf_out, (str, int)):
        assert list(np.asarray(our_out).tolist()) == hf_out.tolist()
    else:
        assert our_out == hf_out


# --------------------------------------------------------------------------------------------------
# The documented call and its variants


def test_chat_new_text_as_transformers(pipes):
    hf, ours = pipes
    messages = chat(pil(IMAGE), "What is shown in this image?")
    want = hf(text=messages, max_new_tokens=20, return_full_text=False)
    got = ours(text=messages, max_new_tokens=20, return_full_text=False)
    same(want, got)
    assert len(got) == 1 and set(got[0]) == {"input_text", "generated_text"}
    assert got[0]["input_text"] is messages and isinstance(got[0]["generated_text"], str) and got[0]["generated_text"]


def test_chat_full_text_is_the_chat_plus_the_answer(pipes):
    hf, ours = pipes
    messages = chat(pil(IMAGE), "Describe the picture in detail.")
    want = hf(text=messages, max_new_tokens=12)
    got = ours(text=messages, max_new_tokens=12)
    same(want, got)
    full = got[0]["generated_text"]
    assert full[:-1] == messages and full[-1]["role"] == "assistant" and isinstance(full[-1]["content"], str)


def test_batch_of_chats_gives_one_list_per_chat(pipes):
    hf, ours = pipes
    chats = [chat(pil(IMAGE), "What is shown in this image?"), chat("Tell me a story about a cat."), chat(pil(OTHER), pil(IMAGE), "Compare.")]
    want = hf(text=chats, max_new_tokens=8, return_full_text=False)
    got = ours(text=chats, max_new_tokens=8, return_full_text=False)
    same(want, got)
    assert len(got) == 3 and all(isinstance(item, list) and len(item) == 1 for item in got)
    # batch_size groups the chats into padded batches; greedy answers stay the same.
    same(want, ours(text=chats, max_new_tokens=8, return_full_text=False, batch_size=3))


def test_a_generator_of_inputs_yields_each_result(pipes):
    """As transformers' pipelines: an iterator of inputs gives an iterator of their results (its arguments checked at
    the call), and an iterator of messages is one chat."""
    hf, ours = pipes
    chats = [chat(pil(IMAGE), "What is shown in this image?"), chat("Tell me a story about a cat.")]
    got = ours((c for c in chats), max_new_tokens=6)
    assert not isinstance(got, list)  # (lazy: each result as its input comes)
    same(list(hf((c for c in chats), max_new_tokens=6)), list(got))
    same(hf((m for m in chats[1]), max_new_tokens=6), ours((m for m in chats[1]), max_new_tokens=6))
    with pytest.raises(ValueError, match="'max_new_tokens' is defined twice"):
        ours((c for c in chats), max_new_tokens=6, generate_kwargs={"max_new_tokens": 5})


def test_chat_as_first_positional_argument(pipes):
    hf, ours = pipes
    messages = chat(pil(OTHER), "What is this?")
    same(hf(messages, max_new_tokens=6), ours(messages, max_new_tokens=6))


@pytest.mark.parametrize("return_full_text", [False, True])
def test_assistant_prefill_is_continued(pipes, return_full_text):
    hf, ours = pipes
    messages = chat(pil(IMAGE), "What is shown in this image?", prefill="The image shows")
    want = hf(text=messages, max_new_tokens=10, return_full_text=return_full_text)
    got = ours(text=messages, max_new_tokens=10, return_full_text=return_full_text)
    same(want, got)
    if return_full_text:
        assert got[0]["generated_text"][-1]["content"][-1]["text"].startswith("The image shows")


def test_prompt_strings_with_images(pipes):
    hf, ours = pipes
    prompt = "[INST] <image>\nWhat is shown in this image? [/INST]"
    same(hf(images=IMAGE, text=prompt, max_new_tokens=10), ours(images=IMAGE, text=prompt, max_new_tokens=10))
    # A list of prompts with their images is one padded batch: one record per prompt, no nesting.
    prompts = [prompt, "[INST] <image> and <image>: which is brighter? [/INST]"]
    want = hf(images=[IMAGE, OTHER, IMAGE], text=prompts, max_new_tokens=6, return_full_text=False)
    got = ours(images=[IMAGE, OTHER, IMAGE], text=prompts, max_new_tokens=6, return_full_text=False)
    same(want, got)
    assert len(got) == 2 and all(isinstance(item, dict) for item in got)


def test_prompt_string_images_are_reloaded_as_transformers_does(pipes, tmp_path):
    """transformers' pipeline passes the PIL images that come with prompt strings through `load_image`: EXIF-rotated,
    transparency dropped by convert("RGB") (where the processor alone puts it on white)."""
    hf, ours = pipes
    prompt = "[INST] <image>\nWhat is shown in this image? [/INST]"
    clear = random_image(300, 200, mode="RGBA", seed=5)  # (random alpha)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    random_image(300, 500, seed=6).save(tmp_path / "turned.jpg", exif=exif)
    for image in (clear, Image.open(tmp_path / "turned.jpg")):
        same(hf(images=image, text=prompt, max_new_tokens=10), ours(images=image, text=prompt, max_new_tokens=10))


def test_text_only(pipes):
    hf, ours = pipes
    same(hf(text="[INST] Hello there [/INST]", max_new_tokens=6), ours(text="[INST] Hello there [/INST]", max_new_tokens=6))
    prompts = ["[INST] Hello [/INST]", "[INST] How many apples? [/INST]"]
    same(hf(text=prompts, max_new_tokens=5), ours(text=prompts, max_new_tokens=5))


def test_other_call_forms(pipes):
    hf, ours = pipes
    prompt = "[INST] <image>\nWhat? [/INST]"
    calls = [
        ((({"images": IMAGE, "text": prompt}),), {}),  # one dict input
        ((), dict(images=[IMAGE], text=prompt)),
        ((), dict(text="[INST] hi [/INST]", return_full_text=False, skip_special_tokens=False)),
        ((), dict(text=[{"role": "user", "content": "plain string content"}], clean_up_tokenization_spaces=True)),
        ((), dict(text=chat("Hi", prefill="Sure"), continue_final_message=False)),  # a new assistant turn after it
    ]
    for args, kwargs in calls:
        same(hf(*args, max_new_tokens=4, **kwargs), ours(*args, max_new_tokens=4, **kwargs))


def test_more_call_forms_as_transformers(pipes):
    """Strings given first are prompts, as transformers reads them (even one naming a file); a tuple of prompts is one
    batch; a generator given as text, or of prompt strings, lists of them and dicts, yields each result; an empty one
    gives []; chat template variables are taken; batch_size=None and num_workers change nothing."""
    hf, ours = pipes
    prompts = ["[INST] Hello [/INST]", "[INST] How many apples? [/INST]"]
    for args, kwargs in [
        (("[INST] Hello there [/INST]",), {}), ((prompts,), {}), ((), dict(text=tuple(prompts))),
        ((), dict(text=chat("Hi"), enable_thinking=False, batch_size=None, num_workers=0)),
    ]:
        same(hf(*args, max_new_tokens=4, **kwargs), ours(*args, max_new_tokens=4, **kwargs))
    items = [prompts[0], prompts, {"images": IMAGE, "text": "[INST] <image>\nWhat? [/INST]"}]
    same(list(hf((i for i in items), max_new_tokens=4)), list(ours((i for i in items), max_new_tokens=4)))
    same(list(hf(text=(p for p in prompts), max_new_tokens=4)), list(ours(text=(p for p in prompts), max_new_tokens=4)))
    assert ours(i for i in []) == [] == hf(i for i in [])
    with pytest.raises(ValueError, match=r"an input dict takes the keys 'images' and 'text' .*got \['image', 'text'\]"):
        ours({"image": IMAGE, "text": "[INST] <image>\nWhat? [/INST]"})  # (the image would be left out)
    with pytest.raises(ValueError, match=r"return_type must be one of transformers' ReturnType"):
        ours(text=chat("Hi"), return_type=1)
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) for prompt strings: enable_thinking"):
        ours(text=prompts[0], enable_thinking=False)
    with pytest.raises(TypeError, match=r"unsupported argument\(s\): tokenize \(the pipeline renders a chat's template as text itself\)"):
        ours(text=chat("Hi"), tokenize=True)
    # A call's add_generation_prompt is the template's, as in transformers; a dict's other keys are left alone; a tuple
    # within a list of prompts is one batch.
    for args, kwargs in [
        ((), dict(text=chat("Hi"), add_generation_prompt=False)),
        (({"images": IMAGE, "text": "[INST] <image>\nWhat? [/INST]", "label": 3},), {}),
        ((), dict(text=[prompts[0], tuple(prompts)])),
    ]:
        same(hf(*args, max_new_tokens=4, **kwargs), ours(*args, max_new_tokens=4, **kwargs))
    # Template variables given at construction apply to chats, and leave prompt strings alone.
    built = ortllava.pipeline("image-text-to-text", model=ours.model, enable_thinking=False)
    same(hf(text=prompts[0], max_new_tokens=4), built(text=prompts[0], max_new_tokens=4))


def test_special_tokens_kept_show_a_batch_rows_padding(pipes):
    """With skip_special_tokens=False, an answer that ended before the batch's longest shows the pad tokens its row
    of transformers' output holds (the tokenizer's pad)."""
    hf, ours = pipes
    prompts = ["[INST] <image>\nWhat? [/INST]", "[INST] Count to ten. [/INST]"]
    free = ours(images=[IMAGE], text=prompts, return_tensors=True, generate_kwargs={"max_new_tokens": 8, "min_new_tokens": 8})
    rows = [record["generated_token_ids"][-8:].tolist() for record in free]  # (the prompt's ids, then the 8 new ones)
    eos = next(token for token in rows[0][1:5] if token not in rows[1])  # ends row 0 early, not row 1
    kwargs = dict(return_full_text=False, skip_special_tokens=False, generate_kwargs={"max_new_tokens": 8, "eos_token_id": int(eos)})
    want = hf(images=[IMAGE], text=prompts, **kwargs)
    got = ours(images=[IMAGE], text=prompts, **kwargs)
    same(want, got)
    assert got[0]["generated_text"].endswith(ours.processor.decode([ours.processor.tokenizer.pad_token_id]))
    # A list of text prompts, each its own input, runs in batches of batch_size (padded alike).
    texts = ["[INST] Describe a photo. [/INST]", "[INST] Count to ten. [/INST]"]
    free = ours(text=tuple(texts), return_tensors=True, generate_kwargs={"max_new_tokens": 8, "min_new_tokens": 8})
    rows = [record["generated_token_ids"][-8:].tolist() for record in free]
    eos = next(token for token in rows[0][1:5] if token not in rows[1])
    kwargs = dict(return_full_text=False, skip_special_tokens=False, batch_size=2, generate_kwargs={"max_new_tokens": 8, "eos_token_id": int(eos)})
    got = ours(text=texts, **kwargs)
    same(hf(text=texts, **kwargs), got)
    assert got[0][0]["generated_text"].endswith(ours.processor.decode([ours.processor.tokenizer.pad_token_id]))


def test_return_tensors_and_generate_kwargs(pipes, mistral):
    hf, ours = pipes
    messages = chat(pil(IMAGE), "What is shown in this image?")
    kwargs = dict(return_tensors=True, generate_kwargs={"max_new_tokens": 9, "min_new_tokens": 9, "repetition_penalty": 1.3})
    want = hf(text=messages, **kwargs)
    got = ours(text=messages, **kwargs)
    same(want, got)
    assert set(got[0]) == {"input_text", "generated_token_ids"}
    from transformers import GenerationConfig  # (a generation config among them, as there)

    config = dict(return_tensors=True, generate_kwargs={"generation_config": GenerationConfig(max_new_tokens=7, min_new_tokens=7, no_repeat_ngram_size=2)})
    same(hf(text=messages, **config), ours(text=messages, **config))
    # At construction, and a call's replacing the construction's generation settings whole.
    built = GenerationConfig(max_new_tokens=5, min_new_tokens=5, repetition_penalty=1.3)
    hf_built = transformers.pipeline("image-text-to-text", model=str(mistral.checkpoint), generation_config=built, max_new_tokens=6)
    ours_built = ortllava.pipeline("image-text-to-text", model=mistral.bundle, device="cpu", generation_config=built, max_new_tokens=6)
    for call in ({}, config):
        same(hf_built(text=messages, **{"return_tensors": True, **call}), ours_built(text=messages, **{"return_tensors": True, **call}))


def test_max_length_in_generate_kwargs_as_transformers(pipes):
    """A generation `max_length` (prompt + new tokens) in `generate_kwargs`, as there; a call's direct one is refused
    (transformers hands it to the processor)."""
    hf, ours = pipes
    messages = chat(pil(IMAGE), "What is shown in this image?")
    length = ours.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"].shape[1]
    kwargs = dict(return_tensors=True, generate_kwargs={"max_length": length + 4, "min_new_tokens": 4})
    want = hf(text=messages, **kwargs)
    got = ours(text=messages, **kwargs)
    same(want, got)
    assert len(got[0]["generated_token_ids"]) == length + 4
    with pytest.raises(TypeError, match="generate_kwargs"):
        ours(text=messages, max_length=length + 4)


def test_construction_settings_combine_with_a_calls_as_transformers(mistral):
    """At construction, generation settings given directly (max_length among them) apply to every call; a call's
    generate_kwargs (or max_new_tokens, stop_sequence) replace the construction's generate_kwargs whole."""
    messages = chat(pil(OTHER), "Describe.")
    length = ortllava.load(mistral.bundle, provider="cpu", verify=False).processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"].shape[1]
    construction = dict(max_length=length + 5, min_new_tokens=5, generate_kwargs={"repetition_penalty": 1.5, "max_new_tokens": 3})
    hf = transformers.pipeline("image-text-to-text", model=str(mistral.checkpoint), **construction)
    ours = ortllava.pipeline("image-text-to-text", model=mistral.bundle, device="cpu", **construction)
    calls = [
        dict(return_tensors=True),  # the construction's generate_kwargs (max_new_tokens wins over max_length)
        dict(return_tensors=True, generate_kwargs={"min_new_tokens": 5}),  # replaced: max_length, no penalty
        dict(return_tensors=True, max_new_tokens=6),  # replaced too
    ]
    lengths = []
    for call in calls:
        want = hf(text=messages, **call)
        got = ours(text=messages, **call)
        same(want, got)
        lengths.append(len(got[0]["generated_token_ids"]) - length)
    assert lengths == [3, 5, 6]


def test_num_return_sequences_gives_records_as_transformers(pipes):
    """n records per input, grouped as transformers' pipeline groups them: a chat's list holds n, a list of
    chats one such list per chat, a list of prompt strings (one batch) n per prompt in a flat list. Sampled with
    top_k=1 (deterministic) so the two sides can be compared; the prompts differ, so a wrong order shows."""
    hf, ours = pipes
    kwargs = dict(generate_kwargs={"do_sample": True, "top_k": 1, "num_return_sequences": 2, "max_new_tokens": 6, "min_new_tokens": 6},
                  return_full_text=False)
    one, other = chat(pil(IMAGE), "What is shown in this image?"), chat("Tell me a story.")
    for text in (one, [one, other]):
        want = hf(text=text, **kwargs)
        got = ours(text=text, **kwargs)
        same(want, got)
    assert len(got) == 2 and all(len(records) == 2 for records in got)
    prompts = ["[INST] <image>\nWhat? [/INST]", "[INST] Count to ten. [/INST]"]
    want = hf(images=[IMAGE], text=prompts, **kwargs)
    got = ours(images=[IMAGE], text=prompts, **kwargs)
    same(want, got)
    assert len(got) == 4 and got[0] == got[1] and got[0] != got[2]


def test_generation_settings_at_construction(mistral, pipes):
    hf, _ = pipes
    ours = ortllava.pipeline("image-text-to-text", model=mistral.bundle, device="cpu", max_new_tokens=7)
    messages = chat(pil(OTHER), "Describe.")
    same(hf(text=messages, max_new_tokens=7, return_full_text=False), ours(text=messages, return_full_text=False))


def test_template_with_bos_and_prefill_on_llama3(tiny_store):
    """Llama-3's template writes the BOS itself: transformers then adds no BOS; a prefill continues the answer."""
    llama3 = tiny_store.get("llama3")
    hf = transformers.pipeline("image-text-to-text", model=str(llama3.checkpoint))
    ours = ortllava.pipeline("image-text-to-text", model=llama3.bundle, device="cpu")
    for messages in (chat(pil(IMAGE), "What is shown in this image?"), chat(pil(IMAGE), "What is it?", prefill="It is")):
        want = hf(text=messages, max_new_tokens=8, return_tensors=True)
        got = ours(text=messages, max_new_tokens=8, return_tensors=True)
        same(want, got)
        ids = got[0]["generated_token_ids"].tolist()
        assert ids.count(hf.tokenizer.bos_token_id) == 1 and ids[0] == hf.tokenizer.bos_token_id
        same(hf(text=messages, max_new_tokens=8), ours(text=messages, max_new_tokens=8))


def test_stop_sequence_ends_the_answer_and_stays_in_it(pipes):
    hf, ours = pipes
    messages = chat(pil(IMAGE), "What is shown in this image?")
    free = ours(text=messages, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
    stop = re.search(r"[a-z]{3}", free[4:]).group(0)  # plain letters (see hf_pipeline's note on stop strings)
    want = hf(text=messages, max_new_tokens=20, return_full_text=False, stop_sequence=stop)
    got = ours(text=messages, max_new_tokens=20, return_full_text=False, stop_sequence=stop)
    same(want, got)
    text = got[0]["generated_text"]
    assert stop in text and free.startswith(text) and len(text) < len(free)
    # transformers' generate form of stop strings, with the tokenizer it matches them with; a stop_sequence replaces them
    strings = {"max_new_tokens": 20, "stop_strings": [stop], "tokenizer": hf.tokenizer}
    same(want, ours(text=messages, return_full_text=False, generate_kwargs=strings))
    other = {**strings, "stop_strings": [free[1:4]]}
    same(want, ours(text=messages, return_full_text=False, generate_kwargs=other, stop_sequence=stop))
    unset = {"max_new_tokens": 20, "stop_strings": None, "tokenizer": hf.tokenizer}  # (as transformers takes them)
    same(ours(text=messages, return_full_text=False, max_new_tokens=20), ours(text=messages, return_full_text=False, generate_kwargs=unset))


def test_stop_strings_end_the_answer_as_transformers_generate(pipes):
    """`Pipeline.generate(stop_strings=..., tokenizer=...)`, as transformers' generate: the answer ends with the token
    that completes the string, which stays in it (tokens identical); a stream gives the same text; `stop` cuts it."""
    hf, ours = pipes
    pipe = ours.model
    messages = chat(pil(IMAGE), "What is shown in this image?")
    free = pipe.generate(messages=messages, max_new_tokens=20)
    stop = re.search(r"[a-z]{3}", free.text[4:]).group(0)
    inputs = hf.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = hf.model.generate(**inputs, do_sample=False, max_new_tokens=20, stop_strings=[stop], tokenizer=hf.processor.tokenizer)
    want = out[0, inputs["input_ids"].shape[1] :].tolist()
    got = pipe.generate(messages=messages, max_new_tokens=20, stop_strings=stop, tokenizer=hf.processor.tokenizer)
    assert got.token_ids == want and len(want) < len(free.token_ids) and got.finish_reason == "stop"
    assert stop in got.text and got.text == pipe.processor.decode(want, skip_special_tokens=True)
    chunks = list(pipe.stream(messages=messages, max_new_tokens=20, stop_strings=[stop]))
    assert "".join(c.text for c in chunks) == got.text and chunks[-1].finish_reason == "stop"
    assert [t for c in chunks for t in c.token_ids] == want
    assert pipe.generate(messages=messages, max_new_tokens=20, stop=stop).text == got.text[: got.text.index(stop)]
    with pytest.raises(ValueError, match=r"stop strings: not implemented for beam search"):
        pipe.generate(messages=messages, num_beams=2, stop_strings=[stop])


def test_bad_calls_are_refused(pipes, mistral):
    _, ours = pipes
    with pytest.raises(ValueError, match="Images must be placed"):
        ours(images=IMAGE, text=chat("Hi"))
    with pytest.raises(ValueError, match="provide text"):
        ours(images=IMAGE)
    with pytest.raises(ValueError, match="either text or images"):
        ours()
    with pytest.raises(ValueError, match="defined twice"):
        ours(text=chat("Hi"), max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})
    with pytest.raises(TypeError, match="num_beam_groups"):
        ours(text=chat("Hi"), generate_kwargs={"num_beam_groups": 2})
    with pytest.raises(ValueError, match="image-text-to-text"):
        ortllava.pipeline("text-generation", model=mistral.bundle)
    with pytest.raises(ValueError, match="1 <image> token"):
        ours(images=[IMAGE, OTHER], text="[INST] <image> [/INST]")
    message = chat("Hi")[0]  # one message, not a chat: its keys were read as two prompts, answered
    for call in (lambda: ours(text=message), lambda: ours(message)):
        with pytest.raises(TypeError, match=r"one message dict is not a chat.*\[message\]"):
            call()
    with pytest.raises(TypeError, match="text must be a prompt string.*got int"):
        ours(text=5)


# --------------------------------------------------------------------------------------------------
# Images by path and URL


class _Handler(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            time.sleep(3)
        if self.path in ("/image.png", "/slow.png"):
            body = self.png
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/drip.png":  # a byte at a time, never done within the test's timeout
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            try:
                for byte in self.png[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass  # the client gave up
        elif self.path == "/huge.png":  # one byte over ortllava's limit, streamed
            size = image_module.URL_MAX_BYTES + 1
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"\0" * (1 << 20)
            try:
                for start in range(0, size, len(chunk)):
                    self.wfile.write(chunk[: min(len(chunk), size - start)])
            except OSError:
                pass  # the client stops reading past the limit
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that hang up early (size limit, timeout) are expected here


@pytest.fixture(scope="module")
def server():
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="PNG")
    _Handler.png = buffer.getvalue()
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_images_by_url_path_and_pil_match_transformers(pipes, server, tmp_path):
    hf, ours = pipes
    path = save_png(IMAGE, tmp_path / "image.png")
    forms = {
        "url": {"type": "image", "url": f"{server}/image.png"},
        "path": {"type": "image", "path": str(path)},
        "pil": pil(IMAGE),
        "data_uri": {"type": "image", "url": "data:image/png;base64," + base64.b64encode(_Handler.png).decode()},
    }
    answers = {}
    for name, item in forms.items():
        messages = chat(item, "What is shown in this image?")
        want = hf(text=messages, max_new_tokens=10, return_full_text=False)
        got = ours(text=messages, max_new_tokens=10, return_full_text=False)
        same(want, got)
        answers[name] = got[0]["generated_text"]
    assert answers["url"] == answers["path"] == answers["pil"] == answers["data_uri"]  # the same pixels, however they arrive
    # A URL as the images= argument of the prompt form, with the pipeline's timeout.
    prompt = "[INST] <image>\nWhat is shown in this image? [/INST]"
    same(hf(images=f"{server}/image.png", text=prompt, max_new_tokens=5, timeout=5),
         ours(images=f"{server}/image.png", text=prompt, max_new_tokens=5, timeout=5))


def test_url_size_limit(pipes, server):
    _, ours = pipes
    messages = chat({"type": "image", "url": f"{server}/huge.png"}, "What is this?")
    with pytest.raises(ImageLoadError, match=f"huge.png is larger than the {image_module.URL_MAX_BYTES} byte limit"):
        ours(text=messages, max_new_tokens=2)
    with pytest.raises(ImageLoadError, match="byte limit"):  # also with the pipeline's own timeout
        ours(text=messages, max_new_tokens=2, timeout=10)


def test_url_timeout(pipes, server, monkeypatch):
    _, ours = pipes
    messages = chat({"type": "image", "url": f"{server}/slow.png"}, "What is this?")
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="slow.png.*timed out"):
        ours(text=messages, max_new_tokens=2, timeout=0.5)
    assert time.perf_counter() - start < 2.5
    # The timeout bounds the whole download, not only each wait: this server sends a byte every 0.1 s.
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match="drip.png: the download took longer than 0.5 s"):
        ours(text=chat({"type": "image", "url": f"{server}/drip.png"}, "What is this?"), max_new_tokens=2, timeout=0.5)
    assert time.perf_counter() - start < 2.0
    # Without timeout=, URLs are fetched by load_image, with its timeout and size limit.
    seen = []
    real = urllib.request.urlopen

    def spy(url, *args, **kwargs):
        seen.append(kwargs.get("timeout", args[1] if len(args) > 1 else None))
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", spy)
    ours(text=chat({"type": "image", "url": f"{server}/image.png"}, "Hi"), max_new_tokens=1)
    assert seen == [image_module.URL_TIMEOUT_S]
