"""Multi-turn chat (`pipe.chat()`, `ortllava chat`): every turn equals recomputing the whole conversation
(and transformers' `generate` on it), while only the new tokens are prefilled."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

import ortllava
from ortllava.chat import ChatSession
from ortllava.preprocess.image import image_hw

from conftest import random_image, save_png

GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
IMAGES = [random_image(640, 480, seed=31), random_image(300, 500, seed=32)]
# Turn 1 with an image, turn 2 text only, turn 3 with another image.
TURNS = [("What is shown here?", [IMAGES[0]]), ("Tell me more about it.", None), ("And in this one?", [IMAGES[1]])]


@pytest.fixture(scope="module", params=["mistral", "mistral-concat"])
def setup(request, tiny_store):
    tiny = tiny_store.get(request.param)
    return tiny, ortllava.load(tiny.bundle, provider="cpu")


class SpyImageProcessor:
    """The pipe's image processor, recording the (height, width) of the images of each call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, images):
        self.calls.append([list(image_hw(image)) for image in images])
        return self.inner(images)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prompt_ids(pipe, messages) -> list[int]:
    return pipe.prepare(messages=messages)[0]["input_ids"][0].tolist()


def test_turns_equal_recomputation_and_prefill_only_new_tokens(setup, monkeypatch):
    tiny, pipe = setup
    encoded: list[list[list[int]]] = []  # per call of the vision path: the sizes of the images it encoded
    encode = pipe.project_images

    def spy(pixel_values, image_sizes):
        encoded.append(image_sizes.tolist())
        return encode(pixel_values, image_sizes)

    monkeypatch.setattr(pipe, "project_images", spy)
    preprocessed = SpyImageProcessor(pipe.processor.image_processor)  # the sizes of the images each call preprocessed
    monkeypatch.setattr(pipe.processor, "image_processor", preprocessed)
    chat = pipe.chat(system="You are terse.", **GREEDY)
    assert isinstance(chat, ChatSession) and chat.messages[0]["role"] == "system"
    held: list[int] = []  # what the cache should hold: the last prompt and the answer but its last token
    results = []
    for turn, (text, images) in enumerate(TURNS):
        encoded.clear()
        preprocessed.calls.clear()
        result = chat.send(text, images=images)
        preprocessed_by_chat = list(preprocessed.calls)
        history = chat.messages[:-1]
        assert history[-1]["content"][-1] == {"type": "text", "text": text}
        assert chat.messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": result.text}]}
        # Recomputation from scratch: the same tokens, token for token.
        encoded_by_chat = list(encoded)
        recomputed = pipe.generate(messages=history, **GREEDY)
        assert result.token_ids == recomputed.token_ids and result.text == recomputed.text
        assert len(result.token_ids) == GREEDY["max_new_tokens"]
        # Only the tokens the cache lacks were prefilled; only the new images were encoded.
        ids = prompt_ids(pipe, history)
        metrics = result.metrics
        assert metrics.prompt_tokens == len(ids)
        # Only the new images were preprocessed (the earlier ones gave just their sizes), and timed as such.
        assert preprocessed_by_chat == encoded_by_chat
        assert metrics.preprocess_s > 0 and metrics.vision_s >= 0
        assert metrics.preprocess_s + metrics.vision_s + metrics.prefill_s <= metrics.time_to_first_token_s  # each counted once
        if turn == 0:
            assert metrics.prefilled_tokens == len(ids) and encoded_by_chat == [[[480, 640]]]
        else:
            expected = len(ids) - common_prefix(ids, held)
            assert metrics.prefilled_tokens == expected < metrics.prompt_tokens
            assert encoded_by_chat == ([] if images is None else [[[500, 300]]])
            image_tokens = pipe.processor.num_image_tokens(500, 300)
            assert expected < 100 + (image_tokens if images else 0)  # the earlier image(s) were not prefilled again
        held = ids + result.token_ids[:-1]
        assert chat.cached_tokens == len(held)
        results.append(result)

    # transformers' generate on the whole three-turn history (two images) gives the last turn's tokens.
    processor = AutoProcessor.from_pretrained(tiny.checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny.checkpoint).eval()
    inputs = processor.apply_chat_template(chat.messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt_ids(pipe, chat.messages[:-1])
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    assert out[0, inputs["input_ids"].shape[1] :].tolist() == results[-1].token_ids


def test_reset_forgets_the_conversation(setup):
    _, pipe = setup
    chat = pipe.chat(**GREEDY)
    first = chat.send(*TURNS[0])
    chat.send(*TURNS[1])
    chat.reset()
    assert chat.messages == [] and chat.cached_tokens == 0
    again = chat.send(*TURNS[0])
    assert again.token_ids == first.token_ids
    assert again.metrics.prefilled_tokens == again.metrics.prompt_tokens
    assert len(chat.messages) == 2
    with_system = pipe.chat(system="Be brief.", **GREEDY)
    with_system.send("Hello")
    with_system.reset()
    assert with_system.messages == [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}]


def test_seeded_sampling_repeats(setup):
    _, pipe = setup
    sampling = dict(max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=1.5, top_k=40, top_p=0.95)
    runs = []
    for seed in (3, 3, 4):
        chat = pipe.chat(seed=seed, **sampling)
        runs.append([chat.send(text, images=images).token_ids for text, images in TURNS[:2]])
        if seed == 3:  # each turn equals a recomputation with the same seed
            assert pipe.generate(messages=chat.messages[:-1], seed=seed, **sampling).token_ids == runs[-1][-1]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_stream_pieces_join_to_send_text(setup):
    _, pipe = setup
    sent, streamed = pipe.chat(**GREEDY), pipe.chat(**GREEDY)
    for text, images in TURNS:
        result = sent.send(text, images=images)
        chunks = list(streamed.stream(text, images=images))
        assert "".join(chunk.text for chunk in chunks) == result.text
        last = chunks[-1]
        assert last.finish_reason == result.finish_reason and last.metrics.prefilled_tokens == result.metrics.prefilled_tokens
    assert streamed.messages == sent.messages


def test_stream_closed_early_keeps_what_was_shown(setup):
    _, pipe = setup
    chat = pipe.chat(**GREEDY)
    stream = chat.stream(*TURNS[0])
    shown = next(chunk.text for chunk in stream if chunk.text)
    stream.close()
    assert chat.messages[-1]["content"][0]["text"] == shown
    result = chat.send("Go on.")  # the cache holds more than the history says: the prefix logic cuts it back
    assert result.token_ids == pipe.generate(messages=chat.messages[:-1], **GREEDY).token_ids
    assert result.metrics.prefilled_tokens < result.metrics.prompt_tokens
    # A for loop left with `break` lets its stream go: the turn joins the history then (the session holds it weakly).
    chat = pipe.chat(**GREEDY)
    for chunk in chat.stream(*TURNS[0]):
        if chunk.text:
            break
    assert len(chat.messages) == 2 and chat.messages[-1]["content"][0]["text"] == chunk.text


def test_a_session_answers_one_thread_at_a_time(setup, monkeypatch):
    """A second thread's turn on a session that is answering is refused (a RuntimeError that says so), not run over
    the same history and cache; the first turn ends as if alone, and the session goes on."""
    import threading
    import time

    _, pipe = setup
    chat = pipe.chat(**GREEDY)
    decoder, step = pipe.sessions.decoder, pipe.sessions.decoder.step
    answering = threading.Event()

    def slow_step(*args, **kwargs):
        answering.set()
        time.sleep(0.1)
        return step(*args, **kwargs)

    monkeypatch.setattr(decoder, "step", slow_step)
    results = []
    first = threading.Thread(target=lambda: results.append(chat.send(*TURNS[0])))
    first.start()
    assert answering.wait(timeout=60)
    for turn in (lambda: chat.send("Me too."), lambda: chat.stream("Me too."), chat.reset):
        with pytest.raises(RuntimeError, match="answering in another thread: a ChatSession is one conversation, for one thread at a time"):
            turn()
    first.join(timeout=120)
    monkeypatch.undo()
    assert len(chat.messages) == 2 and results[0].token_ids == pipe.generate(messages=[chat.messages[0]], **GREEDY).token_ids
    assert chat.send(*TURNS[1]).text == chat.messages[-1]["content"][0]["text"]
    # A stream another thread opened is its turn until it ends, read or not: between chunks, and before the first.
    for read_first in (True, False):
        opened = []
        reader = threading.Thread(target=lambda: opened.append(chat.stream("Go on.")) or (read_first and next(opened[0])))
        reader.start()
        reader.join(timeout=60)
        with pytest.raises(RuntimeError, match="answering in another thread"):
            chat.send("Me too.")
        chunks = list(opened[0])  # (read on, here: the turn ends as if alone)
        assert chunks and chunks[-1].finish_reason is not None
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 4 and chat.send("Last.").text
    # Another thread's send while stream() is still setting up its turn is refused too (the stream is published
    # before the turn is let go): the send runs where stream() makes the stream's reference.
    import ortllava.chat as chat_module

    refused, tried, make_ref = [], [], chat_module.weakref.ref

    def ref_meanwhile(target, *args):  # (weakref.ref itself, for everything else in the process meanwhile)
        if inspect.isgenerator(target) and not tried:
            tried.append(target)
            other = threading.Thread(target=lambda: refused.append(_raises(RuntimeError, lambda: chat.send("Me too."))))
            other.start()
            other.join(timeout=60)
        return make_ref(target, *args)

    monkeypatch.setattr(chat_module.weakref, "ref", ref_meanwhile)
    stream = chat.stream("And then?")
    monkeypatch.undo()
    assert refused == [True] and list(stream)[-1].finish_reason is not None
    assert [m["content"][-1]["text"] for m in chat.messages if m["role"] == "user"][-1] == "And then?"


def _raises(error: type[BaseException], call) -> bool:
    try:
        call()
    except error:
        return True
    return False


def test_stop_strings_and_arguments(setup):
    _, pipe = setup
    plain = pipe.chat(**GREEDY).send(*TURNS[0])
    starts = [i for i in range(2, len(plain.text) - 1) if not set(plain.text[i : i + 2]) & {"\ufffd", " "}]
    assert starts, plain.text
    stop = plain.text[starts[0] : starts[0] + 2]
    chat = pipe.chat(**GREEDY)
    cut = chat.send(*TURNS[0], stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == plain.text[: plain.text.find(stop)]
    follow = chat.send("Continue.")  # the kept cache holds the tokens past the cut; the answer is still exact
    assert follow.token_ids == pipe.generate(messages=chat.messages[:-1], **GREEDY).token_ids
    with pytest.raises(TypeError, match="bogus"):
        pipe.chat(bogus=1)
    with pytest.raises(TypeError, match="bogus"):
        chat.send("hi", bogus=1)
    with pytest.raises(ortllava.ImageLoadError):
        chat.send("hi", images=["/nonexistent/photo.png"])
    assert len(chat.messages) == 4  # failed turns leave the history as it was


def test_warnings_point_at_the_callers_line(setup):
    """A warning raised deep inside a turn (here: both lengths given, from the settings) is attributed to the line that
    sent or streamed it, as transformers' and Python's own warnings are, not to ortllava's code."""
    _, pipe = setup
    session = pipe.chat()
    for turn in (lambda: session.send("Hi", max_new_tokens=2, max_length=900), lambda: list(session.stream("Hi", max_new_tokens=2, max_length=900)),
                 lambda: pipe.generate("Hi", max_new_tokens=2, max_length=900)):
        with pytest.warns(UserWarning, match="Both `max_new_tokens`") as caught:
            turn()
        assert {os.path.basename(w.filename) for w in caught} == {os.path.basename(__file__)}


def test_images_changed_after_sending_do_not_reach_the_conversation(setup):
    """A camera loop refills one frame buffer; a PIL image is resized in place: the conversation keeps what was sent."""
    _, pipe = setup
    frame = np.array(random_image(320, 240, seed=33))
    photo = random_image(640, 480, seed=34)
    chat = pipe.chat(**GREEDY)
    chat.send("What is this?", images=[frame])
    sent_frame = frame.copy()
    frame[:] = np.array(random_image(320, 240, seed=35))  # the next frame, into the same buffer
    second = chat.send("And now?", images=[frame])
    chat.send("And this photo?", images=[photo])
    photo.thumbnail((200, 150))  # in place, after sending: fewer image tokens than were sent
    last = chat.send("Anything else?")
    kept = [item["image"] for message in chat.messages for item in message["content"] if item["type"] == "image"]
    np.testing.assert_array_equal(np.asarray(kept[0]), sent_frame)
    assert kept[2].size == (640, 480) and kept[0] is not frame and kept[2] is not photo
    assert second.token_ids == pipe.generate(messages=chat.messages[:3], **GREEDY).token_ids
    assert last.token_ids == pipe.generate(messages=chat.messages[:-1], **GREEDY).token_ids


def test_failed_turns_keep_the_cache_and_the_history(setup, monkeypatch):
    _, pipe = setup
    chat = pipe.chat(**GREEDY)
    chat.send(*TURNS[0])
    cached, history = chat.cached_tokens, list(chat.messages)
    with pytest.raises(ortllava.ImageLoadError, match="1, 3 or 4 channels"):  # refused before anything runs
        chat.send("hi", images=[np.zeros((50, 60, 5), np.uint8)])
    with pytest.raises(TypeError, match="a chat message is a string"):
        chat.send(123)
    with pytest.raises(ValueError, match=r"the message's text holds '<image>', the image placeholder: give the images with images="):
        chat.send("What is in <image>?", images=[IMAGES[1]])
    vocab = pipe.manifest.text.vocab_size  # (refused once the turn's ids are known: before its cache is taken)
    with pytest.raises(ValueError, match="vocabulary"):
        chat.send("hi", bad_words_ids=[[vocab + 3]])
    with pytest.raises(ValueError, match="vocabulary"):
        chat.stream("hi", suppress_tokens=[1], sequence_bias=[[[vocab], 2.0]])  # (by the call, not at its first chunk)
    assert chat.cached_tokens == cached and chat.messages == history
    # An error during the answer: neither send nor stream adds the turn to the history.
    decoder = type(pipe.sessions.decoder)
    step, calls = decoder.step, []

    def failing_step(self, cache):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return step(self, cache)

    monkeypatch.setattr(decoder, "step", failing_step)
    with pytest.raises(RuntimeError, match="simulated"):
        chat.send("Tell me more.")
    calls.clear()
    with pytest.raises(RuntimeError, match="simulated"):
        list(chat.stream("Tell me more."))
    assert chat.messages == history
    monkeypatch.undo()

    class FailingStreamer:  # (its first put fails: after the plan took the kept cache, which must come back)
        def put(self, ids):
            raise RuntimeError("streamer down")

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="streamer down"):
        chat.send("Tell me more.", streamer=FailingStreamer())
    assert chat.messages == history and chat.cached_tokens > 0
    follow = chat.send("Tell me more.")
    assert follow.token_ids == pipe.generate(messages=chat.messages[:-1], **GREEDY).token_ids
    assert follow.metrics.prefilled_tokens < follow.metrics.prompt_tokens  # the first turn's cache was kept


def test_cli_chat(setup, tmp_path):
    tiny, pipe = setup
    path = save_png(IMAGES[1], tmp_path / "photo.png")
    script = f"/image {tmp_path / 'missing.png'}\n/image {path}\nDescribe this.\n/bogus\nAnd more?\n/reset\n//etc/hosts?\n/quit\nNever sent.\n"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run(
        [sys.executable, "-m", "ortllava.cli", "chat", str(tiny.bundle), "--provider", "cpu", "--max-new-tokens", "6", "--timings", "--system", "Be brief."],
        input=script.encode(), capture_output=True, check=True, env=env,
    )
    chat = pipe.chat(system="Be brief.", max_new_tokens=6)
    first = chat.send("Describe this.", images=[str(path)])
    second = chat.send("And more?")
    chat.reset()
    third = chat.send("/etc/hosts?")  # (a doubled "/" sends a message that starts with one)
    assert out.stdout.decode("utf-8") == first.text + "\n" + second.text + "\n" + third.text + "\n"
    err = out.stderr.decode("utf-8")
    assert "cannot read image file" in err and "missing.png" in err and "unknown command" in err
    assert err.count("prefilled") == 3 and f"{second.metrics.prefilled_tokens} prefilled" in err
