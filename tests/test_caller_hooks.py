"""The caller's own `logits_processor` and `stopping_criteria` (numpy twins of torch ones) and `streamer` against
transformers': the ids they are given, bit for bit, and the greedy and beam answers, token for token."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers import (
    AutoProcessor, LlavaNextForConditionalGeneration, LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList, TextIteratorStreamer,
)

import ortllava

from conftest import NEW_TOKENS, hf_generate, random_image, user

BATCH = [user(random_image(300, 500, seed=31), "Describe."), user("What is a cat?"), user(random_image(640, 200, seed=32), "And this?")]
BOOSTED = 64  # the processor below boosts a token below this, chosen by the row's whole history


@pytest.fixture(scope="module")
def setup(mistral):
    processor = AutoProcessor.from_pretrained(mistral.checkpoint)
    processor.tokenizer.padding_side = "left"
    model = LlavaNextForConditionalGeneration.from_pretrained(mistral.checkpoint).eval()
    return processor, model, ortllava.load(mistral.bundle, provider="cpu")


class TwinProcessor:
    """No token twice in a row, and a boost to the token the row's ids sum to (mod BOOSTED): it binds on every answer
    and depends on each id of the row (left padding and image tokens too). Records the ids it is called with."""

    def __init__(self, framework: str):
        self.framework = framework
        self.seen: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []  # the scores it was given

    def __call__(self, input_ids, scores):
        self.seen.append(_copied(input_ids))
        self.scores.append(_copied(scores))
        rows = np.arange(len(scores)) if self.framework == "numpy" else torch.arange(len(scores))
        scores[rows, input_ids[:, -1]] = -np.inf
        scores[rows, input_ids.sum(axis=1) % BOOSTED] += 3.0
        return scores


class TwinCriterion:
    """Ends a row at its `token`; records the ids it is called with."""

    def __init__(self, token: int):
        self.token = token
        self.seen: list[np.ndarray] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(_copied(input_ids))
        return input_ids[:, -1] == self.token


def _copied(input_ids) -> np.ndarray:
    return input_ids.numpy().copy() if torch.is_tensor(input_ids) else input_ids.copy()


def test_a_logits_processor_sees_and_does_what_transformers_does(setup):
    processor, model, pipe = setup
    free = hf_generate(processor, model, BATCH)
    theirs, ours = TwinProcessor("torch"), TwinProcessor("numpy")
    # (with one of ortllava's own: the caller's apply after it, as transformers merges them)
    want = hf_generate(processor, model, BATCH, logits_processor=LogitsProcessorList([theirs]), repetition_penalty=1.3)
    got = pipe.generate(messages=BATCH, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, logits_processor=[ours], repetition_penalty=1.3)
    assert [r.token_ids for r in got] == want
    assert want != free  # (it binds)
    assert len(ours.seen) == len(theirs.seen) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(ours.seen, theirs.seen)):
        assert a.dtype == np.int64 and np.array_equal(a, b), step  # the padded prompt with image tokens, then the answer
    for a, b in zip(ours.scores, theirs.scores):  # the logits after the repetition penalty, before the warpers
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # One callable (not a list) is taken too; None or an empty list is no processor.
    alone = pipe.generate(messages=BATCH, max_new_tokens=4, min_new_tokens=4, logits_processor=TwinProcessor("numpy"))
    assert [r.token_ids for r in alone] == hf_generate(processor, model, BATCH, logits_processor=[TwinProcessor("torch")], max_new_tokens=4, min_new_tokens=4)
    plain = pipe.generate(messages=BATCH[1], max_new_tokens=4)
    assert pipe.generate(messages=BATCH[1], max_new_tokens=4, logits_processor=[]).token_ids == plain.token_ids


def test_a_stopping_criterion_ends_rows_where_transformers_ends_them(setup):
    processor, model, pipe = setup
    free = hf_generate(processor, model, BATCH)
    token = free[0][4]  # row 0 ends at its 5th token (or before, where the token comes earlier); others may run on
    end = free[0].index(token)
    theirs, ours = TwinCriterion(token), TwinCriterion(token)
    want = hf_generate(processor, model, BATCH, stopping_criteria=StoppingCriteriaList([theirs]))
    got = pipe.generate(messages=BATCH, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stopping_criteria=[ours])
    pad = pipe._special_ids(pipe.settings())[1]
    assert [r.token_ids + [pad] * (len(want[0]) - len(r.token_ids)) for r in got] == want
    assert len(got[0].token_ids) == end + 1 and got[0].finish_reason == "stop"
    for row, result in enumerate(got):
        assert result.finish_reason == ("stop" if token in result.token_ids else "length")
    assert len(ours.seen) == len(theirs.seen) and all(np.array_equal(a, b) for a, b in zip(ours.seen, theirs.seen))
    # A stream ends at the same token, with the same text.
    chunks = list(pipe.stream(messages=BATCH[0], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stopping_criteria=TwinCriterion(token)))
    assert "".join(c.text for c in chunks) == got[0].text and chunks[-1].finish_reason == "stop"
    assert sum((c.token_ids for c in chunks), []) == got[0].token_ids
    # A chat turn too (its ids are the whole conversation's).
    chat = pipe.chat(stopping_criteria=TwinCriterion(token), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    image, text = (part.get("image", part.get("text")) for part in BATCH[0][0]["content"])
    reply = chat.send(text, images=[image])
    assert reply.token_ids == got[0].token_ids and reply.finish_reason == "stop"


def test_beam_search_applies_a_logits_processor_as_transformers(setup):
    """Under beam search a processor gets each hypothesis' ids (reordered as the beams are) and the log-probabilities."""
    processor, model, pipe = setup
    batch = BATCH[:2]
    inputs = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    theirs, ours = TwinProcessor("torch"), TwinProcessor("numpy")
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, num_beams=3, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, logits_processor=LogitsProcessorList([theirs]),
        )
    got = pipe.generate(messages=batch, num_beams=3, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, logits_processor=ours)
    assert [r.token_ids for r in got] == out[:, inputs["input_ids"].shape[1] :].tolist()
    assert len(ours.seen) == len(theirs.seen) and all(np.array_equal(a, b) for a, b in zip(ours.seen, theirs.seen))


def test_beam_search_ends_the_candidates_a_criterion_ends_as_transformers(setup):
    """Under beam search a criterion is called on every candidate continuation (the prompt's ids, then the candidate's);
    a candidate it ends finishes there, as at an EOS token."""
    processor, model, pipe = setup
    batch = BATCH[:2]
    inputs = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    free = pipe.generate(messages=batch, num_beams=3, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    token = free[0].token_ids[2]
    theirs, ours = TwinCriterion(token), TwinCriterion(token)
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, num_beams=3, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stopping_criteria=StoppingCriteriaList([theirs]),
        )
    got = pipe.generate(messages=batch, num_beams=3, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stopping_criteria=ours)
    pad = pipe._special_ids(pipe.settings())[1]
    want = out[:, inputs["input_ids"].shape[1] :].tolist()
    assert [r.token_ids + [pad] * (len(want[0]) - len(r.token_ids)) for r in got] == want
    assert len(got[0].token_ids) < NEW_TOKENS and got[0].token_ids[-1] == token and got[0].finish_reason == "stop"
    assert [r.finish_reason for r in got] == ["stop" if r.token_ids[-1] == token else "length" for r in got]
    assert len(ours.seen) == len(theirs.seen) and all(np.array_equal(a, b) for a, b in zip(ours.seen, theirs.seen))


def test_a_criterion_cancels_a_generation_from_another_thread(setup):
    processor, model, pipe = setup
    cancel, reached = threading.Event(), threading.Event()
    width = pipe.prepare(messages=BATCH[1])[0]["input_ids"].shape[1]

    def cancelled(input_ids, logits):
        if input_ids.shape[1] == width + 3:  # the third token: wait for the other thread (so the test is deterministic)
            reached.set()
            cancel.wait(timeout=60)
        return cancel.is_set()

    results = []
    worker = threading.Thread(target=lambda: results.append(pipe.generate(messages=BATCH[1], max_new_tokens=200, min_new_tokens=200, stopping_criteria=cancelled)))
    worker.start()
    assert reached.wait(timeout=60)
    cancel.set()
    worker.join(timeout=60)
    (result,) = results
    assert len(result.token_ids) == 3 and result.finish_reason == "stop"


def test_bad_callables_are_refused_clearly(setup):
    processor, model, pipe = setup
    chat = BATCH[1]
    with pytest.raises(TypeError, match="logits_processor must be a callable or a list of them, got int"):
        pipe.generate(messages=chat, logits_processor=5)
    with pytest.raises(TypeError, match="stopping_criteria must hold callables .*, got str"):
        pipe.generate(messages=chat, stopping_criteria=["x"])
    with pytest.raises(TypeError, match="transformers' RepetitionPenaltyLogitsProcessor works on torch tensors.*repetition_penalty"):
        pipe.generate(messages=chat, logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)]))
    with pytest.raises(ValueError, match=r"the logits processor .*<lambda> returned scores of shape \(1, 3\), not \(1, \d+\)"):
        pipe.generate(messages=chat, max_new_tokens=2, logits_processor=lambda ids, scores: scores[:, :3])
    with pytest.raises(ValueError, match=r"the stopping criterion .*<lambda> returned bool of shape \(2,\): it must return a bool, or one bool a row \(\[1\]\)"):
        pipe.generate(messages=chat, max_new_tokens=2, stopping_criteria=lambda ids, logits: np.array([True, False]))
    # A processor that changes the scores in place and returns None is taken.
    def ban_first(ids, scores):
        scores[:, 0] = -np.inf

    assert 0 not in pipe.generate(messages=chat, max_new_tokens=4, logits_processor=ban_first).token_ids


class RecordingStreamer:
    """What transformers' streamers are given: each `put`'s array, and how many times `end` was called."""

    def __init__(self):
        self.puts: list[np.ndarray] = []
        self.ends = 0

    def put(self, value):
        self.puts.append(_copied(value))

    def end(self):
        self.ends += 1


def test_a_streamer_is_given_what_transformers_gives_it(setup):
    """The prompts' ids `[B, T]`, then each step's tokens `[B]` (the pad id for a row that has ended), then `end()`; and
    transformers' own TextIteratorStreamer over ortllava's tokenizer, read in another thread, gives the answer's text."""
    processor, model, pipe = setup
    inputs = processor.apply_chat_template(BATCH, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    free = hf_generate(processor, model, BATCH)
    token = free[0][2]  # (row 0 ends early: the others are streamed on, row 0 as the pad id)
    theirs, ours = RecordingStreamer(), RecordingStreamer()
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=token, streamer=theirs)
    got = pipe.generate(messages=BATCH, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=token, streamer=ours)
    assert len(ours.puts) == len(theirs.puts) > 2 and ours.ends == theirs.ends == 1
    for a, b in zip(ours.puts, theirs.puts):
        assert a.dtype == np.int64 and np.array_equal(a, b)
    assert [int(put[0]) for put in ours.puts[1 : 1 + len(got[0].token_ids)]] == got[0].token_ids

    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    results = []
    worker = threading.Thread(target=lambda: results.append(pipe.generate(messages=BATCH[0], max_new_tokens=NEW_TOKENS, streamer=streamer)))
    worker.start()
    text = "".join(streamer)
    worker.join(timeout=60)
    assert text == results[0].text and text
    # A chat turn takes one too; a stream, beam search, or an object without put and end do not.
    streamed = RecordingStreamer()
    reply = pipe.chat(max_new_tokens=4).send("Hello", streamer=streamed)
    assert [int(put[0]) for put in streamed.puts[1:]] == reply.token_ids and streamed.ends == 1
    with pytest.raises(ValueError, match="a stream gives its text pieces itself: a streamer is for generate"):
        pipe.stream(messages=BATCH[1], streamer=RecordingStreamer())
    with pytest.raises(ValueError, match=r"streamer: not implemented for beam search \(num_beams=2\)"):
        pipe.generate(messages=BATCH[1], num_beams=2, streamer=RecordingStreamer())
    with pytest.raises(TypeError, match="streamer must have put\\(token_ids\\) and end\\(\\) methods, as transformers' TextStreamer has; got list"):
        pipe.generate(messages=BATCH[1], streamer=[])


def test_a_row_a_stop_string_ends_is_fed_the_pad_id(setup):
    """A stop string ends its row as transformers' stopping criteria end one: from the next step the row is fed the pad
    id (what a streamer and the caller's callables see), while the other rows go on as they would have."""
    processor, model, pipe = setup
    free = hf_generate(processor, model, BATCH)
    decode = pipe.processor.tokenizer.decode
    stop = next(text for k in range(2, 8) if (text := decode(free[0][:k]).strip()) and text not in decode(free[1]) + decode(free[2]))
    streamer, pad = RecordingStreamer(), 5
    got = pipe.generate(messages=BATCH, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stop=[stop], pad_token_id=pad, streamer=streamer)
    steps = np.stack(streamer.puts[1:])  # [steps, B]
    ended = len(got[0].token_ids)
    assert got[0].finish_reason == "stop" and stop not in got[0].text and 0 < ended < NEW_TOKENS
    assert steps[:ended, 0].tolist() == free[0][:ended] and (steps[ended:, 0] == pad).all() and len(steps) == NEW_TOKENS
    assert [steps[:, row].tolist() for row in (1, 2)] == free[1:] == [r.token_ids for r in got[1:]]


def test_prefix_allowed_tokens_fn_constrains_as_transformers(setup):
    """transformers' `prefix_allowed_tokens_fn(batch_id, ids)`: the same calls (prompt index, each row's ids) and the same
    answers, greedy and beam search; a prompt whose rows can take none of their allowed tokens takes them at score 0."""
    processor, model, pipe = setup
    vocab = pipe.manifest.text.vocab_size
    inputs = processor.apply_chat_template(BATCH, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)

    def allowed_by(calls: list):
        def allowed(batch_id, ids):  # every third token, shifted by the prompt and the row's last token
            calls.append((batch_id, _copied(ids)))
            return [t for t in range(vocab) if (t + int(ids[-1]) + batch_id) % 3 == 0]
        return allowed

    free = hf_generate(processor, model, BATCH)
    for options in ({}, {"num_beams": 2}):
        theirs, ours = [], []
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8, prefix_allowed_tokens_fn=allowed_by(theirs), **options)
        got = pipe.generate(messages=BATCH, max_new_tokens=8, min_new_tokens=8, prefix_allowed_tokens_fn=allowed_by(ours), **options)
        assert [r.token_ids for r in got] == out[:, inputs["input_ids"].shape[1] :].tolist(), options
        assert len(ours) == len(theirs) and all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(ours, theirs))
    assert [r.token_ids for r in got] != [row[:8] for row in free]  # (it binds)
    # Sampled answers (num_return_sequences): each prompt's rows are asked with its index, as transformers asks.
    theirs, ours = [], []
    with torch.no_grad():
        model.generate(**inputs, do_sample=True, num_return_sequences=2, max_new_tokens=2, prefix_allowed_tokens_fn=allowed_by(theirs))
    pipe.generate(messages=BATCH, do_sample=True, num_return_sequences=2, max_new_tokens=2, prefix_allowed_tokens_fn=allowed_by(ours))
    first = 2 * len(BATCH)  # (the first step's calls, before the draws part)
    assert [b for b, _ in ours[:first]] == [b for b, _ in theirs[:first]] == [0, 0, 1, 1, 2, 2]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(ours[:first], theirs[:first]))
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn returned no token for prompt 0: the constraint cannot be met"):
        pipe.generate(messages=BATCH[1], max_new_tokens=2, prefix_allowed_tokens_fn=lambda batch_id, ids: [])
    with pytest.raises(TypeError, match="prefix_allowed_tokens_fn must be a callable"):
        pipe.generate(messages=BATCH[1], prefix_allowed_tokens_fn=[1, 2])
    # Allowed tokens that are all forbidden (here by suppress_tokens) are taken at score 0, as transformers takes them.
    banned = list(range(0, vocab, 2))
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=3, min_new_tokens=3, suppress_tokens=banned, prefix_allowed_tokens_fn=lambda b, ids: banned[:5])
    got = pipe.generate(messages=BATCH, max_new_tokens=3, min_new_tokens=3, suppress_tokens=banned, prefix_allowed_tokens_fn=lambda b, ids: banned[:5])
    assert [r.token_ids for r in got] == out[:, inputs["input_ids"].shape[1] :].tolist()
