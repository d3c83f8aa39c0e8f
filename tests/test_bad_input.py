"""Bad input gets an error that names the problem, before any graph runs: prompts, images, generation arguments and
processor outputs (bundles and their configs: test_bad_bundle.py)."""

from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ortllava
from ortllava import ImageLoadError

from conftest import random_image, save_png

PROMPT = "[INST] <image>\nWhat is this? [/INST]"


def test_image_count_mismatch_names_both_counts(pipe):
    with pytest.raises(ValueError, match=r"2 <image> token\(s\) but 1 image"):
        pipe.generate(prompt="[INST] <image> <image> [/INST]", images=[random_image(100, 100)])
    with pytest.raises(ValueError, match=r"1 <image> token\(s\) but 0 image"):
        pipe.generate(prompt=PROMPT)
    # A list of images per prompt says which prompt each is for: a shift that the flat count would miss is named.
    a, b, c = (random_image(90 + 10 * i, 80, seed=i) for i in range(3))
    prompts = ["[INST] <image> <image> Two? [/INST]", "[INST] None? [/INST]", "[INST] <image> One? [/INST]"]
    with pytest.raises(ValueError, match=r"prompt 0 holds 2 <image> token\(s\) but its list of images has 1"):
        pipe.generate(prompt=prompts, images=[[a], [b], [c]], max_new_tokens=2)
    nested = pipe.generate(prompt=prompts, images=[[a, b], [], [c]], max_new_tokens=2)
    assert [r.token_ids for r in nested] == [r.token_ids for r in pipe.generate(prompt=prompts, images=[a, b, c], max_new_tokens=2)]


def test_malformed_prompts_and_messages_are_named(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "project_images", lambda *a: pytest.fail("the vision encoder ran"))
    for prompt in (123, b"[INST] hi [/INST]", [], ["ok", 5]):
        with pytest.raises(TypeError, match="prompt must be a string or a non-empty list of strings"):
            pipe.generate(prompt=prompt)
    for messages in ({"role": "user", "content": "hi"}, [], [["not a message"]]):
        with pytest.raises(TypeError, match="messages|chat"):
            pipe.generate(messages=messages)
    with pytest.raises(ValueError, match="stream takes one prompt"):  # refused before the images are encoded
        next(pipe.stream(prompt=[PROMPT, PROMPT], images=[random_image(100, 100)] * 2))
    with pytest.raises(ImageLoadError, match=r"image 0 is empty \(0x10 pixels\)"):
        pipe.generate(prompt=PROMPT, images=[np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(ImageLoadError, match=r"whole 0-255 pixel values, got 127.5 \(dtype float64\)"):
        pipe.generate(prompt=PROMPT, images=[np.full((20, 30, 3), 127.5)])
    for item, named in (({"type": "image", "image": None}, "got 'image' set to None"), ({"type": "image"}, "got none of them")):
        with pytest.raises(ValueError, match=f"an image item needs an 'image', 'url', 'path' or 'base64' key with an image in it, {named}"):
            pipe.generate(messages=[{"role": "user", "content": [item, {"type": "text", "text": "What?"}]}])
    # A text item without its text (transformers renders it as nothing, and answers an empty message).
    for item, what in (({"type": "text", "content": "hi"}, r"is missing \(its other keys: 'content'\)"), ({"type": "text", "text": None}, "is None")):
        with pytest.raises(ValueError, match=f"message 1 has a text item whose 'text' {what}: give"):
            pipe.generate(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [item]}])


def test_final_assistant_message_without_text_is_named(pipe):
    """A final assistant message is continued; one whose content is no text is refused by name."""
    user = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    with pytest.raises(ValueError, match="the final message's content is a int, not text"):
        pipe.generate(messages=[user, {"role": "assistant", "content": 5}])


def test_prompt_with_no_tokens_is_refused(tiny_store):
    qwen = ortllava.load(tiny_store.get("qwen2").bundle, provider="cpu")  # its tokenizer adds no BOS token
    assert qwen.prepare(prompt="")[0]["input_ids"].shape[1] == 0
    with pytest.raises(ValueError, match="prompt 0 of the batch is empty"):
        qwen.generate(prompt="")
    with pytest.raises(ValueError, match="prompt 0 of the batch is empty"):
        qwen.generate(prompt=["", "hi"])


def test_unreadable_image_names_the_file(pipe, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        pipe.generate(prompt=PROMPT, images=[str(broken)])
    with pytest.raises(ImageLoadError, match="missing.png"):
        pipe.generate(prompt=PROMPT, images=[str(tmp_path / "missing.png")])


def test_a_closed_pil_image_is_named(pipe, tmp_path):
    image = Image.open(save_png(random_image(200, 150, seed=13), tmp_path / "photo.png"))
    image.close()
    with pytest.raises(ImageLoadError, match="cannot read the PIL image given: Operation on closed image"):
        pipe.generate(prompt=PROMPT, images=[image])


def test_image_as_base64_or_a_data_uri(pipe, tmp_path):
    path = save_png(random_image(200, 150, seed=13), tmp_path / "photo.png")
    encoded = base64.b64encode(path.read_bytes()).decode()
    want = pipe.processor(text="<image>", images=[str(path)])["pixel_values"]
    for source in (encoded, f"data:image/png;base64,{encoded}", f"data:image/png,{encoded}"):  # as transformers' load_image takes them
        np.testing.assert_array_equal(pipe.processor(text="<image>", images=[source])["pixel_values"], want)
    with pytest.raises(ImageLoadError, match=r"cannot decode image data:image/png;base64,.{20,}\.\.\. \(\d+ characters\)"):
        pipe.generate(prompt=PROMPT, images=["data:image/png;base64," + base64.b64encode(b"x" * 3000).decode()])
    with pytest.raises(ImageLoadError, match="a data URI must be data:image/...;base64"):
        pipe.generate(prompt=PROMPT, images=["data:image/png;base64,@@@"])
    with pytest.raises(ImageLoadError, match="cannot read image file cat: No such file"):  # base64-shaped, but no image
        pipe.generate(prompt=PROMPT, images=["cat"])
    # A file:// URL is the file it names (here with a space, percent-encoded).
    spaced = save_png(random_image(200, 150, seed=13), tmp_path / "a photo.png")
    np.testing.assert_array_equal(pipe.processor(text="<image>", images=[spaced.as_uri()])["pixel_values"], want)
    with pytest.raises(ImageLoadError, match="cannot read image file .*missing.png: No such file"):
        pipe.processor(text="<image>", images=[(tmp_path / "missing.png").as_uri()])
    with pytest.raises(ImageLoadError, match="must name a file on this machine"):
        pipe.processor(text="<image>", images=["file://server/share/a.png"])
    with pytest.raises(ImageLoadError, match="an empty string was given as an image"):  # (not "Is a directory")
        pipe.processor(text="<image>", images=[""])
    with pytest.raises(ImageLoadError, match=r"cannot read the Tensor given as an array: .*detach\(\)"):  # a tensor with no host array
        pipe.processor(text="<image>", images=[torch.zeros(3, 20, 20, requires_grad=True)])


def test_image_sources_a_server_takes_from_untrusted_clients(mistral, pipe, tmp_path):
    """`image_sources=("data",)`: images in prompts and chats come inline (base64, data URIs; PIL images and arrays
    always), and a path or URL is refused before anything is read, whether the file exists or not (a client learns
    nothing of the server's files). Whatever the sources, a path to a FIFO or a device is refused at once (reading
    one would block, or never end)."""
    import os
    import threading

    path = save_png(random_image(200, 150, seed=13), tmp_path / "photo.png")
    encoded = base64.b64encode(path.read_bytes()).decode()
    inline = ortllava.load(mistral.bundle, provider="cpu", image_sources=("data",))
    want = pipe.processor(text="<image>", images=[str(path)])["pixel_values"]
    for source in (encoded, f"data:image/png;base64,{encoded}", random_image(200, 150, seed=13)):
        np.testing.assert_array_equal(inline.processor(text="<image>", images=[source])["pixel_values"], want)
    for source, what in ((str(path), "image paths"), (str(tmp_path / "missing.png"), "image paths"), (path.as_uri(), "image paths"),
                         ("/etc/passwd", "image paths"), ("http://127.0.0.1:9/a.png", "image URLs")):
        with pytest.raises(ImageLoadError, match=f"^{what} are not taken here \\(image sources taken: data\\)"):
            inline.generate(prompt=PROMPT, images=[source], max_new_tokens=2)
    chat = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(ImageLoadError, match="image paths are not taken here"):
        inline.generate(messages=chat, max_new_tokens=2)
    with pytest.raises(ImageLoadError, match="image paths are not taken here"):
        inline.chat().send(chat[0]["content"][1]["text"], images=[str(path)], max_new_tokens=2)
    with pytest.raises(ImageLoadError, match="image paths are not taken here"):
        ortllava.pipeline(model=inline)(text=chat, max_new_tokens=2)
    with pytest.raises(ImageLoadError, match="image paths are not taken here"):
        inline.processor.image_processor(str(path))
    with pytest.raises(ValueError, match="image_sources must be a collection of 'file', 'http', 'data'"):
        ortllava.load(mistral.bundle, provider="cpu", image_sources="data")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(ImageLoadError, pipe.processor, text="<image>", images=[str(fifo)])))
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "reading a FIFO as an image blocked"
    assert outcome and "not a regular file" in str(outcome[0].value)


def test_only_ordinary_image_formats_are_decoded(pipe, tmp_path):
    """A path, URL or base64 string is decoded as PNG, JPEG, WEBP, GIF, BMP or TIFF (as transformers' load_image
    decodes it); another format PIL reads is refused before its plugin parses more than a header: EPS, which PIL
    renders by running Ghostscript, is never handed to it."""
    from unittest import mock

    import PIL.EpsImagePlugin
    from transformers.image_utils import load_image as hf_load_image

    from ortllava.preprocess.image_source import load_image

    image = random_image(40, 30, seed=21)
    for extension, options in (("png", {}), ("jpg", {}), ("webp", {"lossless": True}), ("gif", {}), ("bmp", {}), ("tiff", {})):
        path = tmp_path / f"photo.{extension}"
        image.save(path, **options)
        encoded = base64.b64encode(path.read_bytes()).decode()
        for source in (str(path), f"data:image/{extension};base64,{encoded}"):
            np.testing.assert_array_equal(np.asarray(load_image(source)), np.asarray(hf_load_image(source)))
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    assert PIL.Image.open(eps).format == "EPS"  # (the case: PIL would read it)
    sources = (str(eps), "data:image/png;base64," + base64.b64encode(eps.read_bytes()).decode())
    with mock.patch.object(PIL.EpsImagePlugin, "Ghostscript", side_effect=AssertionError("Ghostscript ran")) as ghostscript:
        for source in sources:
            with pytest.raises(ImageLoadError, match=r"cannot decode image .*: not in an image format taken here \(PNG, JPEG, MPO, WEBP, GIF, BMP, TIFF\)"):
                pipe.processor(text="<image>", images=[source])
    assert not ghostscript.called


def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(pipe, monkeypatch):
    """A 12000x12000 PNG is a few KB, and 144 M pixels decoded: above PIL's limit (where PIL only warns of a
    decompression bomb), it is an ImageLoadError naming its size and the limit, raised on its header, before any
    pixel is decoded. The limit is `image_source.MAX_IMAGE_PIXELS`, which a caller may raise (or set to None)."""
    import io
    import warnings

    from PIL import ImageFile

    from ortllava.preprocess import image_source

    def png_uri(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    bomb = png_uri(Image.new("1", (12000, 12000)))
    assert len(bomb) < 30_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the pixels were decoded"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (PIL's own, before ortllava's error)
        with pytest.raises(ImageLoadError, match=r"image data:image/png;base64,.* is 12000x12000 pixels \(144000000\), above the limit of 89478485 pixels"):
            pipe.generate(prompt=PROMPT, images=[bomb])
        with pytest.raises(ImageLoadError, match=r"is 12000x12000 pixels"):
            pipe.processor.image_processor(bomb[len("data:image/png;base64,"):])  # (plain base64 too)
    monkeypatch.undo()
    small = png_uri(random_image(40, 30, seed=22))
    monkeypatch.setattr(image_source, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    with pytest.raises(ImageLoadError, match=r"is 40x30 pixels \(1200\), above the limit of 1199 pixels"):
        pipe.processor(text="<image>", images=[small])
    for limit in (40 * 30, None):  # raised, or lifted
        monkeypatch.setattr(image_source, "MAX_IMAGE_PIXELS", limit)
        assert pipe.processor(text="<image>", images=[small])["image_sizes"].tolist() == [[30, 40]]


def test_an_array_of_no_image_shape_is_named(pipe):
    """A number or a row of values given as an image: an ImageLoadError naming its shape (not an IndexError)."""
    for array, shape in ((np.array(5, np.uint8), r"\(\)"), (np.zeros(5, np.uint8), r"\(5,\)")):
        with pytest.raises(ImageLoadError, match=f"an image array must have 2 or 3 dimensions, got shape {shape}"):
            pipe.processor(text="<image>", images=[array])
        with pytest.raises(ImageLoadError, match=f"got shape {shape}"):
            pipe.processor.image_processor([array])
        with pytest.raises(ImageLoadError, match=f"got shape {shape}"):
            pipe.generate(prompt=PROMPT, images=[array], max_new_tokens=2)


def test_an_empty_batch_of_text_is_refused(pipe):
    """`processor(text=[])`: refused by name, as the tokenizer refuses it (transformers' processor raises an
    IndexError), before any image is read."""
    for text, got in (([], "an empty list"), ((), "an empty tuple")):
        with pytest.raises(TypeError, match=f"text must be a string or a non-empty list of strings, got {got}"):
            pipe.processor(text=text)
        with pytest.raises(TypeError, match=f"got {got}"):
            pipe.processor(text=text, images=["/nonexistent/photo.png"])
        with pytest.raises(TypeError, match="text must be a string or a non-empty list of strings"):
            pipe.processor.tokenizer(text)


def test_empty_image_list_is_no_images(pipe):
    text = "[INST] Hello there [/INST]"
    want = pipe.generate(prompt=text, max_new_tokens=4).token_ids
    assert pipe.generate(prompt=text, images=[], max_new_tokens=4).token_ids == want
    assert [r.token_ids for r in pipe.generate(prompt=[text, text], images=[[], []], max_new_tokens=4)] == [want, want]


def test_text_that_is_not_unicode_is_named(pipe, mistral):
    with pytest.raises(ValueError, match=r"the prompt is not valid text: 'hi ' is followed by '\\udcff'"):
        pipe.generate(prompt="hi \udcff there")  # what an undecodable byte becomes in a str read by Python
    with pytest.raises(ValueError, match="prompt 1 is not valid text"):
        pipe.generate(prompt=["fine", "bad \udcff"])
    # The chat CLI names the line and goes on with the next one.
    chat = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "chat", str(mistral.bundle), "--provider", "cpu", "--max-new-tokens", "2"],
        input=b"hello\nbad \xff byte\nstill here?\n", capture_output=True,
    )
    assert chat.returncode == 0 and b"is not valid text" in chat.stderr and b"Traceback" not in chat.stderr
    assert len([line for line in chat.stdout.splitlines() if line.strip()]) >= 2  # the first and last lines answered


@pytest.mark.parametrize(
    "argument, message",
    [
        ({"do_sample": True, "temperature": float("nan")}, "temperature must be a number > 0, got nan"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be a number > 0, got nan"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a number > 0, got inf"),
        ({"do_sample": True, "seed": -1}, r"seed must be an integer >= 0, or None"),
        ({"eos_token_id": [2, 10**6], "min_new_tokens": 2}, "eos_token_id 1000000 is not in the model's vocabulary"),
        ({"guidance_scale": 2.0, "negative_prompt_ids": [[1], [2], [3]]}, "negative_prompt_ids holds 3 negative prompts for 1 prompts"),
        ({"guidance_scale": 2.0, "negative_prompt_ids": [[1, 10**6]]}, "negative_prompt_ids: token id 1000000 is not in the model's vocabulary"),
        ({"guidance_scale": 2.0, "negative_prompt_ids": [[7] * 10**6]}, r"1000002 positions asked for; this decoder serves at most"),
    ],
)
def test_bad_generation_arguments_are_named(pipe, argument, message):
    import pickle

    with pytest.raises(ValueError, match=message) as caught:
        pipe.generate(prompt="[INST] hi [/INST]", max_new_tokens=3, **argument)
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)  # (a worker process's error reaches its parent)


def test_habits_from_transformers_get_a_pointer(mistral, pipe):
    """What a transformers user types first: each refusal says what to do instead, and what does nothing is taken."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(ortllava.BundleError, match="if that is a hub id, export a bundle from it first: ortllava-export --model llava-hf/x --output DIR"):
        ortllava.load("llava-hf/x")
    with pytest.raises(TypeError, match=r"load\(\) takes provider=... \('auto', 'cpu', 'cuda' or 'cuda:N'\), not device='cpu'"):
        ortllava.load(mistral.bundle, device="cpu")
    with pytest.raises(TypeError, match=r"got BatchFeature; a processor's output goes in as keyword arguments: generate\(\*\*inputs\)"):
        pipe.generate(pipe.processor(text="hi", return_tensors="np"))
    with pytest.raises(TypeError, match=r"got str; a prompt string goes in Pipeline.generate\(prompt=...\)"):
        ortllava.generate(pipe, "hi")
    # ortllava.generate on a bundle path takes load options; on a loaded pipeline it refuses them.
    assert ortllava.generate(mistral.bundle, messages, provider="cpu", threads=1, max_new_tokens=3).token_ids == pipe.generate(messages=messages, max_new_tokens=3).token_ids
    with pytest.raises(TypeError, match="provider: load options, and this pipeline is loaded already"):
        ortllava.generate(pipe, messages, provider="cpu")
    with pytest.raises(TypeError, match=r"max_new_token \(max_new_token: did you mean max_new_tokens or min_new_tokens\?\)$"):
        pipe.generate(messages=messages, max_new_token=3)  # (the nearest names, not the whole list)
    with pytest.raises(TypeError, match=r"output_scores=True.*\(output_scores: output_logits=True gives each result the raw logits"):
        pipe.generate(messages=messages, output_scores=True)
    for wrong, hint in (("image", r"\(image: images=\.\.\. takes the image\(s\)\)$"), ("text", r"\(text: a prompt string goes in prompt=")):
        with pytest.raises(TypeError, match=f"unknown generation argument\\(s\\): {wrong} {hint}"):
            pipe.generate(messages=messages, **{wrong: "x"})
    with pytest.raises(TypeError, match="these are GenerationResults .* each result's .text is its answer"):
        pipe.processor.batch_decode(pipe.generate(messages=[messages], max_new_tokens=2))
    empty = dict(logits_processor=LogitsProcessorList(), stopping_criteria=StoppingCriteriaList())  # (they do nothing: taken)
    assert pipe.generate(messages=messages, max_new_tokens=3, **empty).token_ids == pipe.generate(messages=messages, max_new_tokens=3).token_ids


def test_prompt_beyond_the_context_is_refused_up_front(pipe, monkeypatch):
    """Refused from the token count alone: neither the vision encoder nor the decoder runs."""
    limit = pipe.manifest.text.max_position_embeddings
    monkeypatch.setattr(pipe, "project_images", lambda *a, **k: pytest.fail("the vision encoder ran"))
    monkeypatch.setattr(pipe.sessions.decoder, "start", lambda *a, **k: pytest.fail("the decoder ran"))
    with pytest.raises(ortllava.ContextLengthError, match=rf"\(images included\) and .* beyond the model's {limit}; .*smaller or fewer images"):
        pipe.generate(prompt=PROMPT, images=[random_image(1000, 700)], max_new_tokens=limit)
    with pytest.raises(ortllava.ContextLengthError, match=rf"^the prompt is \d+ tokens and .* beyond the model's {limit}; shorten the prompt, or lower max_new_tokens$"):
        pipe.generate(prompt="[INST] Hi [/INST]", max_new_tokens=limit)  # (no image: none to make smaller)
    with pytest.raises(ortllava.ContextLengthError, match=rf"max_length is {limit * 2} \(\d+ new tokens\).*lower max_length$"):
        pipe.generate(prompt=PROMPT, images=[random_image(1000, 700)], max_length=limit * 2)


def test_the_default_length_fits_the_room_a_long_prompt_leaves(mistral):
    """Where no one set a length (no argument, no generation config), the default max_new_tokens is held to the
    positions the prompt leaves, rather than refusing a prompt for a length the user never asked for; an explicit
    max_new_tokens is still refused where it does not fit, and a prompt that alone fills the positions too."""
    pipe = ortllava.load(mistral.bundle, provider="cpu", verify=False, max_length=300)
    pipe.generation_config = {}  # (the tiny model's config sets no length either; made sure here)
    prompt = "[INST] " + "hello " * 60 + "[/INST]"
    prompt_tokens = pipe.processor(text=prompt)["input_ids"].shape[1]
    assert pipe.settings().max_new_tokens > 300 - prompt_tokens + 1 and pipe.settings().length_is_default
    with pytest.warns(ortllava.GenerationWarning, match=rf"the prompt \({prompt_tokens} tokens\) leaves room for {300 - prompt_tokens + 1} new tokens of the default 256"):
        result = pipe.generate(prompt=prompt, min_new_tokens=1000)  # (no EOS: the answer fills the room)
    assert len(result.token_ids) == 300 - prompt_tokens + 1 and result.finish_reason == "length"
    with pytest.raises(ortllava.ContextLengthError, match=r"max_new_tokens is 256"):
        pipe.generate(prompt=prompt, max_new_tokens=256)
    with pytest.raises(ortllava.ContextLengthError, match=r"no room is left for an answer; shorten the prompt"):
        pipe.generate(prompt="[INST] " + "hello " * 400 + "[/INST]")


def test_bad_processor_outputs_are_named_before_any_graph_runs(pipe, monkeypatch):
    inputs = pipe.processor(images=random_image(300, 200, seed=5), text="[INST] <image>\nWhat? [/INST]")
    ids, mask, pixels, sizes = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], inputs["image_sizes"]
    image_id, vocab = pipe.processor.image_token_id, pipe.manifest.text.vocab_size
    cut = np.delete(ids, np.flatnonzero(ids[0] == image_id)[0], axis=1)  # one image token fewer
    monkeypatch.setattr(pipe.sessions, "vision", lambda *a: pytest.fail("a graph ran"))
    cases = [
        (dict(input_ids=np.full((1, 3), vocab)), ValueError, f"input_ids hold {vocab}, outside the model's vocabulary of {vocab}"),
        (dict(input_ids=ids.astype(np.float32)), TypeError, "input_ids must hold integers"),
        (dict(input_ids=[[1, 2], [3]]), ValueError, "input_ids must be a rectangular array"),
        (dict(input_ids=np.zeros((1, 0), np.int64)), ValueError, "input_ids must be .batch, tokens."),
        (dict(input_ids=ids), ValueError, "image tokens but no pixel_values"),
        (dict(input_ids=ids, pixel_values=pixels), ValueError, "give pixel_values and image_sizes together"),
        (dict(input_ids=ids, attention_mask=mask[:, 1:], pixel_values=pixels, image_sizes=sizes), ValueError, "attention_mask must be 0s and 1s"),
        (dict(input_ids=ids, pixel_values=pixels[0], image_sizes=sizes), ValueError, "pixel_values must be .n_images, max_tiles, 3, 336, 336."),
        (dict(input_ids=ids, pixel_values=pixels[:, :1], image_sizes=sizes), ValueError, "pixel_values hold 1 tiles per image"),
        (dict(input_ids=ids, pixel_values=pixels, image_sizes=sizes[:, :1]), ValueError, "image_sizes must be .n_images, 2."),
        (dict(input_ids=ids, pixel_values=np.where(pixels > 1, np.nan, pixels), image_sizes=sizes), ValueError, "pixel_values hold NaN or infinite"),
        (dict(input_ids=cut, pixel_values=pixels, image_sizes=sizes), ValueError, "image tokens but the 1 image.s. of image_sizes give"),
        (dict(input_ids=np.pad(ids, ((0, 0), (1, 0)), constant_values=image_id), attention_mask=np.pad(mask, ((0, 0), (1, 0))),
              pixel_values=pixels, image_sizes=sizes), ValueError, "image tokens where attention_mask is 0"),
        (dict(input_ids=ids, prompt="Hi"), ValueError, "give either input_ids"),
        (dict(pixel_values=pixels, prompt="Hi"), ValueError, "come with input_ids"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            pipe.generate(max_new_tokens=2, **arguments)
    with pytest.raises(ValueError, match="one row of input_ids"):
        next(pipe.stream(input_ids=np.ones((2, 3), np.int64), max_new_tokens=2))
    with pytest.raises(TypeError, match="colour"):  # when called, not at the first chunk
        pipe.stream(prompt="Hi", colour="red")
    # The inputs too: a server learns of a client's mistake before it answers (before it sends a first chunk).
    with pytest.raises(ImageLoadError, match="missing.png"):
        pipe.stream(prompt=PROMPT, images=["/nonexistent/missing.png"])
    with pytest.raises(ortllava.ContextLengthError):
        pipe.stream(prompt="[INST] " + "word " * 10_000 + "[/INST]", max_new_tokens=2)
    session = pipe.chat()
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        session.stream("Hi", max_new_tokens=0)
    with pytest.raises(ImageLoadError, match="missing.png"):
        session.stream("Hi", images=["/nonexistent/missing.png"])
    assert session.messages == [] and "".join(chunk.text for chunk in session.stream("Hi", max_new_tokens=2)) == session.messages[-1]["content"][0]["text"]
    with pytest.raises(TypeError, match="system must be a string"):
        pipe.chat(system=["You are terse."])
    monkeypatch.undo()
    # What is fine: a float mask of 0s and 1s, and empty image lists with a text-only prompt.
    text = pipe.processor(text="[INST] Hi [/INST]")
    want = pipe.generate(**text, max_new_tokens=3)[0].token_ids
    assert pipe.generate(input_ids=text["input_ids"], attention_mask=text["attention_mask"].astype(np.float32), max_new_tokens=3)[0].token_ids == want
    assert pipe.generate(**text, pixel_values=[], image_sizes=[], max_new_tokens=3)[0].token_ids == want
    # The processor's mm_token_type_ids (return_mm_token_type_ids=True) are taken back, checked against the image tokens.
    typed = pipe.processor(images=[random_image(200, 200)], text=PROMPT, return_mm_token_type_ids=True)
    plain = {key: value for key, value in typed.items() if key != "mm_token_type_ids"}
    assert pipe.generate(**typed, max_new_tokens=3)[0].token_ids == pipe.generate(**plain, max_new_tokens=3)[0].token_ids
    with pytest.raises(ValueError, match="mm_token_type_ids must be input_ids' shape, 1 at its image tokens"):
        pipe.generate(**{**typed, "mm_token_type_ids": np.zeros_like(typed["mm_token_type_ids"])}, max_new_tokens=3)


def test_pad_id_outside_the_vocabulary_is_refused_up_front(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "project_images", lambda *a, **k: pytest.fail("the vision encoder ran"))
    with pytest.raises(ValueError, match=f"pad_token_id 1000000 is not in the model's vocabulary of {pipe.manifest.text.vocab_size}"):
        pipe.generate(prompt=PROMPT, images=[random_image(200, 200)], pad_token_id=10**6)


def test_full_conversation_says_how_to_go_on(mistral):
    chat = ortllava.load(mistral.bundle, provider="cpu", max_length=300).chat(max_new_tokens=8)
    words = "hello " * 40  # ~170 tokens: two such turns do not fit 300 positions, one does
    chat.send(words)
    with pytest.raises(ortllava.ContextLengthError, match=r"This conversation is full: reset\(\)"):
        chat.send(words + "again")
    with pytest.raises(ortllava.ContextLengthError) as refused:  # an image's ~1000 tokens fit no conversation here
        chat.send("And this?", images=[random_image(300, 200)])
    assert "reset()" not in str(refused.value)
    chat.reset()
    assert chat.send(words + "again").token_ids
