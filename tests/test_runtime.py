"""Runtime behaviour that needs no reference: IO binding, sampling, the CLI, torch-free import, and bad input."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ortllava
from ortllava import BundleError, ImageLoadError

from conftest import random_image, save_png, session_config, without_packages

PROMPT = "[INST] <image>\nWhat is this? [/INST]"


@pytest.fixture(scope="module")
def pipe(mistral):
    return ortllava.load(mistral.bundle, provider="cpu")


def test_concat_decoder_io_binding_gives_the_same_tokens(tiny_store):
    concat = tiny_store.get("mistral-concat").bundle
    plain = ortllava.load(concat, provider="cpu")
    bound = ortllava.load(concat, provider="cpu", io_binding=True)
    assert bound.sessions.device is not None and plain.sessions.device is None
    image = random_image(500, 300, seed=5)
    plain_results = plain.generate(prompt=[PROMPT, "[INST] hi [/INST]"], images=[image], max_new_tokens=12, min_new_tokens=12)
    bound_results = bound.generate(prompt=[PROMPT, "[INST] hi [/INST]"], images=[image], max_new_tokens=12, min_new_tokens=12)
    assert [r.token_ids for r in bound_results] == [r.token_ids for r in plain_results]
    # The cache between steps is device OrtValues, not numpy arrays.
    embeds = np.zeros((1, 3, bound.manifest.text.hidden_size), np.float32)
    _, cache = bound.sessions.decoder.start(embeds, np.ones((1, 3), np.int64), capacity=8)
    assert all(type(value).__name__ == "OrtValue" for value in cache.state["kv"])


def test_only_the_decoder_spins_its_idle_threads(pipe):
    """The vision encoder and projector run once per image and hand over to another session: their idle worker
    threads block instead of spinning on the cores the next session needs (`stop_idle_threads_spinning`); the
    decoder's keep spinning between its steps. The time this saves is in DESIGN.md ("Decisions worth knowing")."""
    vision = pipe.sessions.vision
    sessions = (vision.encoder, vision.projector, pipe.sessions.decoder.session)
    # (no entry: onnxruntime's default, spinning)
    assert [session_config(s, "session.intra_op.allow_spinning") != "0" for s in sessions] == [False, False, True]


def test_seeded_sampling_repeats_and_differs_from_greedy(pipe):
    image = random_image(400, 400, seed=6)
    kwargs = dict(prompt=PROMPT, images=[image], max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    first = pipe.generate(seed=7, **kwargs)
    again = pipe.generate(seed=7, **kwargs)
    other = pipe.generate(seed=8, **kwargs)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert first.token_ids != pipe.generate(**{**kwargs, "do_sample": False}).token_ids


def test_module_level_generate_and_path_images(mistral, tmp_path):
    path = save_png(random_image(320, 240, seed=9), tmp_path / "photo.png")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Describe"}]}]
    result = ortllava.generate(mistral.bundle, messages, max_new_tokens=4)
    assert isinstance(result, ortllava.GenerationResult) and 1 <= len(result.token_ids) <= 4


def test_cli_generate_prints_the_answer(mistral, pipe, tmp_path):
    path = save_png(random_image(320, 240, seed=10), tmp_path / "photo.png")
    out = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--image", str(path), "--prompt", "Describe", "--max-new-tokens", "5", "--provider", "cpu"],
        capture_output=True, text=True, check=True,
    )
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "Describe"}]}]
    expected = pipe.generate(messages=messages, max_new_tokens=5).text
    assert out.stdout.strip() == expected.strip()
    streamed = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--image", str(path), "--prompt", "Describe", "--max-new-tokens", "5", "--provider", "cpu", "--stream", "--timings"],
        capture_output=True, text=True, check=True,
    )
    assert streamed.stdout.strip() == expected.strip() and "time to first token" in streamed.stderr
    from_stdin = subprocess.run(  # --prompt -: the question from stdin
        [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--image", str(path), "--prompt", "-", "--max-new-tokens", "5", "--provider", "cpu"],
        input="Describe\n", capture_output=True, text=True, check=True,
    )
    assert from_stdin.stdout.strip() == expected.strip()


def test_auto_runs_a_cpu_bundle_on_the_cpu_where_cuda_is_present(mistral, monkeypatch):
    """provider="auto" picks CUDA only for a bundle made for it: an fp32 fused decoder or an int8 cache, which the
    CUDA provider cannot run (or has not been verified on), load on the CPU; provider="cuda" names the reason."""
    import dataclasses

    from ortllava import sessions
    from ortllava.manifest import read_manifest

    monkeypatch.setattr(sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="provider 'auto' runs this bundle on the CPU: this bundle's fused decoder is fp32") as caught:
        assert ortllava.load(mistral.bundle).provider == "CPUExecutionProvider"
    assert caught[0].filename == __file__  # it points at the caller's load()
    with pytest.raises(BundleError, match="fused decoder is fp32, which the CUDA provider cannot run"):
        ortllava.load(mistral.bundle, provider="cuda")
    decoder = read_manifest(mistral.bundle).graphs["decoder"]
    assert sessions.cuda_refusal(dataclasses.replace(decoder, dtype="float16")) is None
    assert "int8" in sessions.cuda_refusal(dataclasses.replace(decoder, dtype="float16", kv_dtype="int8"))
    assert sessions.cuda_refusal(dataclasses.replace(decoder, kind="concat")) is None


def test_a_released_cache_goes_to_one_generation(mistral, monkeypatch):
    """Two generations starting at once never share the buffers the last one left: the hand-off is atomic (the
    window between reading and clearing the spare is widened here, so that without the lock both would take it)."""
    import threading
    import time

    from ortllava.decoders import FusedDecoder

    decoder = ortllava.load(mistral.bundle, provider="cpu").sessions.decoder
    held = {"spare": None}

    def slow_read(self):
        spare = held["spare"]
        time.sleep(0.05)
        return spare

    monkeypatch.setattr(FusedDecoder, "_spare", property(slow_read, lambda self, value: held.update(spare=value)), raising=False)
    decoder.release(decoder._new_cache(1, 256))
    start, taken = threading.Barrier(2), []

    def take() -> None:
        start.wait()
        taken.append(decoder._new_cache(1, 256))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 2 and taken[0] is not taken[1]


@pytest.mark.parametrize("config", ["mistral", "mistral-concat"])
def test_generations_in_several_threads_are_those_run_one_by_one(tiny_store, config):
    """A Pipeline shared by threads (a server's workers): each generation keeps its own keys/values, so answers
    that run at the same time are the ones they give alone; a finished cache is reused by one generation only."""
    import threading

    pipe = ortllava.load(tiny_store.get(config).bundle, provider="cpu")
    images = [random_image(300, 200, seed=61), random_image(250, 500, seed=62)]
    chats = [
        [{"role": "user", "content": ([{"type": "image", "image": images[i % 2]}] if i % 2 == 0 else []) + [{"type": "text", "text": "Why? " * (1 + i)}]}]
        for i in range(6)
    ]
    alone = [pipe.generate(messages=chat, max_new_tokens=8, min_new_tokens=8).token_ids for chat in chats]
    for _ in range(2):
        together: list = [None] * len(chats)

        def answer(i: int) -> None:
            together[i] = pipe.generate(messages=chats[i], max_new_tokens=8, min_new_tokens=8).token_ids

        threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(chats))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert together == alone


def test_cli_takes_generate_arguments_as_flags(mistral, pipe):
    """`generate` (and `chat`) take the sampling arguments as flags: a seeded sampled answer is the API's for the same
    settings; a sampling flag without sampling, and a value out of range, are refused by name."""
    cli = [sys.executable, "-m", "ortllava.cli", "generate", str(mistral.bundle), "--prompt", "Tell a story", "--provider", "cpu", "--max-new-tokens", "8"]
    flags = ["--do-sample", "--temperature", "1.5", "--top-k", "0", "--seed", "3", "--repetition-penalty", "1.2"]
    sampled = subprocess.run([*cli, *flags], capture_output=True, text=True, check=True)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell a story"}]}]
    settings = dict(do_sample=True, temperature=1.5, top_k=0, seed=3, repetition_penalty=1.2)
    want = pipe.generate(messages=messages, max_new_tokens=8, **settings).text
    assert sampled.stdout == want + "\n" and want != pipe.generate(messages=messages, max_new_tokens=8).text
    for extra, message in ((["--temperature", "0.7", "--seed", "1"], "--temperature, --seed only apply when sampling: add --do-sample"),
                           (["--do-sample", "--top-p", "2"], "top_p must be a number in (0, 1]")):
        for command in (cli, [sys.executable, "-m", "ortllava.cli", "chat", str(mistral.bundle), "--provider", "cpu"]):
            refused = subprocess.run([*command, *extra], capture_output=True, text=True, input="")
            assert refused.returncode == 1 and message in refused.stderr and "Traceback" not in refused.stderr


def test_runtime_imports_and_generates_without_torch_or_transformers(mistral, tmp_path):
    path = save_png(random_image(300, 200, seed=11), tmp_path / "photo.png")
    script = without_packages("torch", "transformers", "optimum", "ortllava_export") + textwrap.dedent(f"""
        import json
        import ortllava
        pipe = ortllava.load({str(mistral.bundle)!r}, provider="cpu")
        result = pipe.generate(prompt={PROMPT!r}, images=[{str(path)!r}], max_new_tokens=6, min_new_tokens=6)
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print(json.dumps(result.token_ids))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = ortllava.load(mistral.bundle, provider="cpu").generate(prompt=PROMPT, images=[str(path)], max_new_tokens=6, min_new_tokens=6)
    assert json.loads(out.stdout) == expected.token_ids


# --------------------------------------------------------------------------------------------------
# Bad input


def test_image_count_mismatch_names_both_counts(pipe):
    with pytest.raises(ValueError, match=r"2 <image> token\(s\) but 1 image"):
        pipe.generate(prompt="[INST] <image> <image> [/INST]", images=[random_image(100, 100)])
    with pytest.raises(ValueError, match=r"1 <image> token\(s\) but 0 image"):
        pipe.generate(prompt=PROMPT)


def test_malformed_prompts_and_messages_are_named(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode_images", lambda *a: pytest.fail("the vision encoder ran"))
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


def test_image_as_base64_or_a_data_uri(pipe, tmp_path):
    path = save_png(random_image(200, 150, seed=13), tmp_path / "photo.png")
    encoded = base64.b64encode(path.read_bytes()).decode()
    want = pipe.processor(text="<image>", images=[str(path)])["pixel_values"]
    for source in (encoded, f"data:image/png;base64,{encoded}"):  # as transformers' load_image takes them
        np.testing.assert_array_equal(pipe.processor(text="<image>", images=[source])["pixel_values"], want)
    with pytest.raises(ImageLoadError, match=r"cannot decode image data:image/png;base64,.{20,}\.\.\. \(\d+ characters\)"):
        pipe.generate(prompt=PROMPT, images=["data:image/png;base64," + base64.b64encode(b"x" * 3000).decode()])
    with pytest.raises(ImageLoadError, match="a data URI must be data:image/...;base64"):
        pipe.generate(prompt=PROMPT, images=["data:image/png,rawbytes"])
    with pytest.raises(ImageLoadError, match="cannot read image file cat: No such file"):  # base64-shaped, but no image
        pipe.generate(prompt=PROMPT, images=["cat"])


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
    ],
)
def test_bad_generation_arguments_are_named(pipe, argument, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate(prompt="[INST] hi [/INST]", max_new_tokens=3, **argument)


def test_prompt_beyond_the_context_is_refused_up_front(pipe, monkeypatch):
    """Refused from the token count alone: neither the vision encoder nor the decoder runs."""
    limit = pipe.manifest.text.max_position_embeddings
    monkeypatch.setattr(pipe, "encode_images", lambda *a, **k: pytest.fail("the vision encoder ran"))
    monkeypatch.setattr(pipe.sessions.decoder, "start", lambda *a, **k: pytest.fail("the decoder ran"))
    with pytest.raises(ortllava.ContextLengthError, match=rf"beyond the model's {limit}"):
        pipe.generate(prompt=PROMPT, images=[random_image(1000, 700)], max_new_tokens=limit)


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
    monkeypatch.undo()
    # What is fine: a float mask of 0s and 1s, and empty image lists with a text-only prompt.
    text = pipe.processor(text="[INST] Hi [/INST]")
    want = pipe.generate(**text, max_new_tokens=3)[0].token_ids
    assert pipe.generate(input_ids=text["input_ids"], attention_mask=text["attention_mask"].astype(np.float32), max_new_tokens=3)[0].token_ids == want
    assert pipe.generate(**text, pixel_values=[], image_sizes=[], max_new_tokens=3)[0].token_ids == want


def test_pad_id_outside_the_vocabulary_is_refused_up_front(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode_images", lambda *a, **k: pytest.fail("the vision encoder ran"))
    with pytest.raises(ValueError, match=f"pad_token_id 1000000 is not in the model's vocabulary of {pipe.manifest.text.vocab_size}"):
        pipe.generate(prompt=PROMPT, images=[random_image(200, 200)], pad_token_id=10**6)


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_damaged_bundle_names_the_file(mistral, tmp_path, damage):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    target = copy / "projector.onnx"
    if damage == "missing":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-10] ^= 0xFF
        target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="projector.onnx"):
        ortllava.load(copy, provider="cpu")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_manifest(edit):
    def damage(path):
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps(edit(manifest)))
    return damage


@pytest.mark.parametrize(
    "name, damage, message",
    [  # damage that no sha256 check sees: verify=False, or a manifest edited by hand
        ("embed_tokens.npy", _truncate, r"embed_tokens.npy cannot be read \(ValueError: mmap length"),
        ("image_newline.npy", lambda path: np.save(path, np.zeros(3, np.float32)), r"image_newline.npy cannot be read .*its shape is \[3\]"),
        ("tokenizer.json", lambda path: path.write_text("{]"), "tokenizer.json cannot be read"),
        ("preprocessor_config.json", _truncate, "preprocessor_config.json cannot be read"),
        ("generation_config.json", lambda path: path.write_text("[1, 2]"), "generation_config.json cannot be read .*not an object"),
        ("chat_template.jinja", lambda path: path.write_bytes(b"\xff\xfe"), "chat_template.jinja cannot be read"),
        ("manifest.json", lambda path: path.write_text("[]"), "manifest.json is damaged: it holds a JSON list"),
        ("manifest.json", lambda path: path.write_bytes(b"\xff{}"), "manifest.json is unreadable"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "files": list(m["files"])}), "'files' must be a JSON object, got a list"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "graphs": {k: v for k, v in m["graphs"].items() if k != "decoder"}}), "'graphs' has no decoder"),
        ("manifest.json", _edit_manifest(lambda m: {k: v for k, v in m.items() if k != "text"}), "the key 'text' is missing"),
        ("manifest.json", _edit_manifest(lambda m: {**m, "schema_version": "1"}), "has schema version '1'; this ortllava reads version 1"),
    ],
)
def test_damaged_files_are_named_without_hashing(mistral, tmp_path, name, damage, message):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    damage(copy / name)
    with pytest.raises(BundleError, match=message):
        ortllava.load(copy, provider="cpu", verify=False)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        ortllava.load(tmp_path, provider="cpu")


# --------------------------------------------------------------------------------------------------
# Streaming and stopping


@pytest.mark.parametrize("seed", range(4))
def test_stream_pieces_join_to_the_generated_text(pipe, seed):
    kwargs = dict(prompt=PROMPT, images=[random_image(300, 300, seed=seed)], max_new_tokens=40, do_sample=True, temperature=1.3, seed=seed)
    chunks = list(pipe.stream(**kwargs))
    result = pipe.generate(**kwargs)
    assert "".join(chunk.text for chunk in chunks) == result.text
    assert chunks[-1].finish_reason == result.finish_reason and chunks[-1].metrics is not None
    # A chunk carries the token that released its text: in order, a subsequence of the answer's tokens.
    remaining = iter(result.token_ids)
    assert all(any(token == t for t in remaining) for token in (c.token for c in chunks[:-1] if c.token is not None))


def test_stop_strings_cut_the_answer(pipe):
    kwargs = dict(prompt=PROMPT, images=[random_image(300, 300, seed=3)], max_new_tokens=30, min_new_tokens=30)
    full = pipe.generate(**kwargs)
    assert len(full.text) > 6
    stop = full.text[4:7]
    cut = pipe.generate(stop=[stop], **kwargs)
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < len(full.token_ids)
    streamed = list(pipe.stream(stop=[stop], **kwargs))
    assert "".join(c.text for c in streamed) == cut.text and streamed[-1].finish_reason == "stop"


def test_streaming_detokenizer_never_splits_a_character(pipe):
    from ortllava.detokenizer import StreamingDetokenizer

    text = "café 東京 😀 naïve → ∑"
    ids = pipe.processor.tokenizer.encode(text, add_special_tokens=False).ids
    detokenizer = StreamingDetokenizer(pipe.processor.decode)
    pieces = [detokenizer.add(token) for token in ids] + [detokenizer.finalize()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_cli_says_what_a_long_load_does(mistral, monkeypatch, capsys):
    """A large bundle's load (sha256 checks, sessions: seconds to minutes) is announced, then timed, on stderr."""
    from ortllava import cli

    monkeypatch.setattr(cli, "LONG_LOAD_BYTES", 0)  # (the tiny bundle as if it were large)
    command = ["generate", str(mistral.bundle), "--prompt", "Hi", "--max-new-tokens", "2", "--provider", "cpu"]
    assert cli.main(command) == 0
    err = capsys.readouterr().err
    assert "GiB of bundle files: checking every file's sha256 (--no-verify skips it), then creating the sessions ..." in err
    assert "loaded in " in err and " s on CPUExecutionProvider" in err
    assert cli.main([*command, "--no-verify"]) == 0
    err = capsys.readouterr().err
    assert "creating the sessions" in err and "sha256" not in err
    monkeypatch.undo()
    assert cli.main(command) == 0 and "loading" not in capsys.readouterr().err  # a small bundle loads quietly


def test_cli_tells_what_to_do(mistral, tmp_path):
    path = save_png(random_image(120, 90, seed=12), tmp_path / "photo.png")
    cli = [sys.executable, "-m", "ortllava.cli"]
    out = subprocess.run([*cli, "generate", str(mistral.bundle), "--image", str(path), "--prompt", "<image> What is it?", "--provider", "cpu"], capture_output=True, text=True)
    assert out.returncode == 1 and "leave it out of --prompt" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*cli, "info", str(mistral.bundle), "--json", "--no-verify"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["graphs"]["decoder"]["kind"] == "gqa"  # the manifest alone: JSON a tool can read
    out = subprocess.run([*cli, "chat", str(mistral.bundle), "--provider", "cpu", "--max-new-tokens", "9000"], input="/image\nhello\n", capture_output=True, text=True)
    assert "/image needs a path or URL" in out.stderr and "beyond the model's" in out.stderr


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


def test_bundle_loaded_without_hashing_still_names_a_missing_file(mistral, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        ortllava.load(copy, provider="cpu", verify=False)



def test_bad_load_options_are_named(mistral):
    with pytest.raises(ValueError, match="threads must be a number of threads"):
        ortllava.load(mistral.bundle, provider="cpu", verify=False, threads="2")
    with pytest.raises(ValueError, match="max_length must be a positive number"):
        ortllava.load(mistral.bundle, provider="cpu", verify=False, max_length=0)


def test_generation_config_settings_not_implemented_are_warned_of(mistral, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    config = copy / "generation_config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "no_repeat_ngram_size": 2, "num_beams": 1, "typical_p": 1.0, "max_length": 4096}))
    with pytest.warns(UserWarning, match=r"sets no_repeat_ngram_size=2, which ortllava does not implement") as caught:
        ortllava.load(copy, provider="cpu", verify=False)
    assert len(caught) == 1 and "num_beams" not in str(caught[0].message)  # values that do nothing are not named


def test_cli_leaves_unset_arguments_to_the_generation_config(mistral, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(mistral.bundle, copy)
    config = copy / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 3, "min_new_tokens": 3}))
    out = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "generate", str(copy), "--prompt", "Hi", "--provider", "cpu", "--no-verify", "--timings"],
        capture_output=True, text=True, check=True,
    )
    assert ", 3 new;" in out.stderr


def test_cli_interrupted_exits_quietly(mistral, monkeypatch, capsys):
    from ortllava import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    assert cli.main(["info", str(mistral.bundle)]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_in_the_chat_cli_stops_the_answer_not_the_chat(mistral, monkeypatch, capsys):
    import io

    from ortllava import cli
    from ortllava.decoders import FusedDecoder

    step, calls = FusedDecoder.step, []

    def interrupted_once(self, cache):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C during the first answer
            raise KeyboardInterrupt
        return step(self, cache)

    monkeypatch.setattr(FusedDecoder, "step", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nsecond question\n"))
    assert cli.main(["chat", str(mistral.bundle), "--provider", "cpu", "--max-new-tokens", "4", "--no-verify"]) == 0
    captured = capsys.readouterr()
    assert "[stopped]" in captured.err and "Traceback" not in captured.err
    assert len(calls) > 2  # the second question was answered
