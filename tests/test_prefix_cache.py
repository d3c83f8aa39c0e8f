"""`ortllava.load(bundle, prefix_cache=True)`: a one-prompt generation starts from the last one's keys/values where
the prompts begin alike (the same images by their pixels), and answers exactly as a pipeline without it does."""

from __future__ import annotations

import pytest

import ortllava

from conftest import at_once, random_image, user

GREEDY = dict(max_new_tokens=8, min_new_tokens=8)
IMAGE, OTHER = random_image(640, 480, seed=41), random_image(640, 480, seed=42)  # the same size: the same token count


@pytest.fixture(scope="module", params=["mistral", "mistral-concat"])
def pipes(request, tiny_store):
    """(with the prefix cache, without it: the reference) on one bundle."""
    tiny = tiny_store.get(request.param)
    return ortllava.load(tiny.bundle, provider="cpu", prefix_cache=True), ortllava.load(tiny.bundle, provider="cpu")


class VisionSpy:
    """Counts the tiles that go through the vision path."""

    def __init__(self, pipe, monkeypatch):
        self.tiles = 0
        inner = pipe.sessions.vision

        def vision(tiles):
            self.tiles += len(tiles)
            return inner(tiles)

        monkeypatch.setattr(pipe.sessions, "vision", vision)


def test_a_second_question_about_an_image_reuses_its_prefill(pipes, monkeypatch):
    cached, fresh = pipes
    spy = VisionSpy(cached, monkeypatch)
    first = cached.generate(messages=user(IMAGE, "What is shown in this image?"), **GREEDY)
    tiles = spy.tiles
    assert first.metrics.prefilled_tokens == first.metrics.prompt_tokens and tiles > 0
    for question in ("Describe the colours.", "What is shown in this image?"):  # another question, then the first again
        messages = user(IMAGE, question)
        second = cached.generate(messages=messages, **GREEDY)
        assert second.token_ids == fresh.generate(messages=messages, **GREEDY).token_ids
        assert second.metrics.prefilled_tokens < 20 < second.metrics.prompt_tokens  # the image and the text before it were kept
    assert spy.tiles == tiles  # the image was not encoded again
    # Streamed, and from processor outputs: the same path.
    messages = user(IMAGE, "And the shapes?")
    want = fresh.generate(messages=messages, **GREEDY)
    assert "".join(chunk.text for chunk in cached.stream(messages=messages, **GREEDY)) == want.text
    inputs = cached.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    (row,) = cached.generate(**inputs, **GREEDY)
    assert row.token_ids == want.token_ids and row.metrics.prefilled_tokens == 1  # the same prompt: only its last token runs
    assert spy.tiles == tiles


def test_an_image_is_kept_only_if_its_pixels_are_the_same(pipes, monkeypatch):
    """Another image of the same size (the same tokens), or the same image object changed in place, runs again."""
    cached, fresh = pipes
    spy = VisionSpy(cached, monkeypatch)
    cached.generate(messages=user(IMAGE, "What is shown in this image?"), **GREEDY)
    nearly = IMAGE.copy()
    nearly.putpixel((0, 0), (1, 2, 3))  # one pixel differs
    for image in (OTHER, nearly):
        before = spy.tiles
        messages = user(image, "What is shown in this image?")
        got = cached.generate(messages=messages, **GREEDY)
        assert got.token_ids == fresh.generate(messages=messages, **GREEDY).token_ids
        assert spy.tiles > before and got.metrics.prefilled_tokens > got.metrics.prompt_tokens - 20
    mutable = IMAGE.copy()
    cached.generate(messages=user(mutable, "Hi"), **GREEDY)
    mutable.paste((0, 0, 0), (0, 0, 50, 50))  # the caller reuses its buffer
    messages = user(mutable, "Hi")
    got = cached.generate(messages=messages, **GREEDY)
    assert got.token_ids == fresh.generate(messages=messages, **GREEDY).token_ids
    assert got.metrics.prefilled_tokens > got.metrics.prompt_tokens - 20


def test_batches_and_several_answers_go_around_it(pipes):
    """A batch, or several answers to one prompt, start afresh and leave the kept cache as it was."""
    cached, fresh = pipes
    messages = user(IMAGE, "What is shown in this image?")
    cached.generate(messages=messages, **GREEDY)
    batch = [user(OTHER, "Describe."), user("A question without an image?")]
    assert [r.token_ids for r in cached.generate(messages=batch, **GREEDY)] == [r.token_ids for r in fresh.generate(messages=batch, **GREEDY)]
    sampled = dict(GREEDY, do_sample=True, num_return_sequences=2, seed=3)
    assert [r.token_ids for r in cached.generate(messages=messages, **sampled)] == [r.token_ids for r in fresh.generate(messages=messages, **sampled)]
    again = cached.generate(messages=messages, **GREEDY)
    assert again.metrics.prefilled_tokens == 1 and again.token_ids == fresh.generate(messages=messages, **GREEDY).token_ids


def test_generations_at_once_each_answer_as_alone(pipes):
    """Threads share the pipeline: one takes the kept cache, the others start afresh; every answer is its own."""
    cached, fresh = pipes
    questions = [user(IMAGE if i % 2 else OTHER, f"Question number {i}?") for i in range(6)]
    want = [fresh.generate(messages=messages, **GREEDY).token_ids for messages in questions]
    for _ in range(2):  # the second round finds a kept cache
        got = at_once([lambda messages=messages: cached.generate(messages=messages, **GREEDY).token_ids for messages in questions])
        assert got == want


def test_prefix_cache_is_off_unless_asked(pipes, tiny_store):
    _, fresh = pipes
    messages = user(IMAGE, "What is shown in this image?")
    fresh.generate(messages=messages, **GREEDY)
    again = fresh.generate(messages=messages, **GREEDY)
    assert fresh.prefix is None and again.metrics.prefilled_tokens == again.metrics.prompt_tokens
    with pytest.raises(ValueError, match="prefix_cache must be True or False"):
        ortllava.load(tiny_store.get("mistral").bundle, provider="cpu", verify=False, prefix_cache="yes")


def test_a_failed_generation_leaves_the_kept_cache(pipes, monkeypatch):
    """A generation that fails before its prefill (here: encoding its new image) keeps the cache for the next."""
    cached, _ = pipes
    messages = user(IMAGE, "What is shown in this image?")
    cached.generate(messages=messages, **GREEDY)

    def failing(*args, **kwargs):
        raise RuntimeError("the vision encoder failed")

    with monkeypatch.context() as patch:
        patch.setattr(cached, "project_images", failing)
        with pytest.raises(RuntimeError, match="the vision encoder failed"):
            cached.generate(messages=user(OTHER, "And this one?"), **GREEDY)
    assert cached.prefix.cached_tokens > 0
    assert cached.generate(messages=messages, **GREEDY).metrics.prefilled_tokens == 1


def test_a_mistake_in_the_arguments_leaves_the_kept_cache(pipes):
    """An argument refused only once the inputs are known (a banned token past the vocabulary) is refused before the
    kept cache is taken, by the call itself (a stream's too, not at its first chunk): the next prompt still reuses it."""
    cached, _ = pipes
    messages = user(IMAGE, "What is shown in this image?")
    cached.generate(messages=messages, **GREEDY)
    held = cached.prefix.cached_tokens
    vocab = cached.manifest.text.vocab_size
    for bad in (dict(bad_words_ids=[[vocab + 5]]), dict(sequence_bias=[[[vocab], 1.0]]), dict(forced_eos_token_id=vocab)):
        with pytest.raises(ValueError, match="vocabulary"):
            cached.generate(messages=messages, **GREEDY, **bad)
        with pytest.raises(ValueError, match="vocabulary"):
            cached.stream(messages=messages, **GREEDY, **bad)  # (not iterated)
        assert cached.prefix.cached_tokens == held
    assert cached.generate(messages=messages, **GREEDY).metrics.prefilled_tokens == 1


class FailingRuns:
    """Makes the decoder session's runs from the `fail_at`-th on raise `error` (an interrupt, a failed kernel)."""

    def __init__(self, pipe, monkeypatch, fail_at: int, error: BaseException):
        self.calls = 0
        session = pipe.sessions.decoder.session
        for name in ("run", "run_with_iobinding"):  # (the concat decoder's host mode calls run)
            inner = getattr(session, name)

            def failing(*args, inner=inner, **kwargs):
                self.calls += 1
                if self.calls >= fail_at:
                    raise error
                return inner(*args, **kwargs)

            monkeypatch.setattr(session, name, failing)


def test_an_interrupted_prompt_or_step_keeps_what_the_cache_held(pipes, monkeypatch):
    """A prompt run that fails (Ctrl-C, a failed kernel) gives the kept cache back, cut to what the prompts share; a
    decode step that fails leaves the cache as it was before the step. The next generation reuses it and answers as
    a pipeline without the cache."""
    cached, fresh = pipes
    cached.generate(messages=user(IMAGE, "What is shown in this image?"), **GREEDY)
    held = cached.prefix.cached_tokens
    messages = user(IMAGE, "Describe the colours.")
    want = fresh.generate(messages=messages, **GREEDY).token_ids
    with monkeypatch.context() as patch:
        FailingRuns(cached, patch, fail_at=1, error=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            cached.generate(messages=messages, **GREEDY)
    kept = cached.prefix.cached_tokens
    assert 0 < kept < held  # the image and the text before the question
    again = cached.generate(messages=messages, **GREEDY)
    assert again.token_ids == want and again.metrics.prefilled_tokens < 20
    with monkeypatch.context() as patch:  # the prompt's run (its last token), two steps, then a failure
        FailingRuns(cached, patch, fail_at=4, error=RuntimeError("a kernel failed"))
        with pytest.raises(RuntimeError, match="a kernel failed"):
            cached.generate(messages=messages, **GREEDY)
    assert cached.prefix.cached_tokens == again.metrics.prompt_tokens + 2  # the prompt and the two steps' tokens
    third = cached.generate(messages=messages, **GREEDY)
    assert third.token_ids == want and third.metrics.prefilled_tokens == 1
