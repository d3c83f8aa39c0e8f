"""Greedy generations token for token against `model.generate(do_sample=False)`, for every tiny configuration."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

import ortllava

from conftest import CONFIGS, NEW_TOKENS, SameDraws, hf_generate, random_image, user

IMAGES = [random_image(640, 480, seed=21), random_image(300, 900, seed=22), random_image(200, 200, seed=23)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request, tiny_store):
    tiny = tiny_store.get(request.param)
    processor = AutoProcessor.from_pretrained(tiny.checkpoint)
    processor.tokenizer.padding_side = "left"
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny.checkpoint).eval()
    return processor, model, ortllava.load(tiny.bundle, provider="cpu")


CASES = {
    "one image": [user(IMAGES[0], "What is shown in this image?")],
    "two images": [user(IMAGES[0], IMAGES[1], "Compare the two images.")],
    "batch of three": [user(IMAGES[1], "Describe."), user("A longer question without any image at all, please?"), user(IMAGES[2], IMAGES[0], "Which is brighter?")],
    "text only": [user("Tell me a story about a cat.")],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_identical(setup, case):
    processor, model, pipe = setup
    conversations = CASES[case]
    want = hf_generate(processor, model, conversations)
    got = pipe.generate(messages=conversations, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert [r.token_ids for r in got] == want
    for result in got:
        assert len(result.token_ids) == NEW_TOKENS
        assert result.finish_reason == "length"  # min_new_tokens = max_new_tokens: no EOS could end it
        assert result.text == processor.decode(result.token_ids, skip_special_tokens=True)


def test_prompt_form_matches_processor_call(setup):
    processor, model, pipe = setup
    prompt = processor.apply_chat_template(CASES["one image"][0], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[IMAGES[0]], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    want = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = set(pipe._special_ids(pipe.settings())[0])
    want = want[: next((i + 1 for i, t in enumerate(want) if t in eos), len(want))]
    result = pipe.generate(prompt=prompt, images=[IMAGES[0]], max_new_tokens=NEW_TOKENS)
    assert result.token_ids == want
    assert result.finish_reason == ("stop" if want[-1] in eos else "length")
    assert result.metrics.time_to_first_token_s > 0 and result.metrics.prompt_tokens == inputs["input_ids"].shape[1]


def test_eos_ends_each_answer_where_transformers_ends_it(setup):
    """Answers end at an EOS token exactly where transformers' do: one EOS id, the second of two, and held back by
    min_new_tokens; a batch's rows that ended are fed the pad id transformers feeds (its output shows them)."""
    processor, model, pipe = setup
    conversations = CASES["batch of three"]
    free = hf_generate(processor, model, conversations)  # no EOS possible: each row's first NEW_TOKENS tokens
    eos = free[0][3]  # row 0 ends at its 4th token (or earlier, where the token comes before)
    end = free[0].index(eos)
    real_eos = pipe.manifest.tokens.eos_token_ids[0]
    for options in ({"eos_token_id": eos}, {"eos_token_id": [real_eos, eos]}, {"eos_token_id": eos, "min_new_tokens": end + 2}):
        want = hf_generate(processor, model, conversations, **{"min_new_tokens": 0, **options})
        got = pipe.generate(messages=conversations, max_new_tokens=NEW_TOKENS, do_sample=False, **options)
        pad = pipe._special_ids(pipe.settings(**options))[1]
        width = len(want[0])
        assert [r.token_ids + [pad] * (width - len(r.token_ids)) for r in got] == want, options
        stops = set(options["eos_token_id"]) if isinstance(options["eos_token_id"], list) else {options["eos_token_id"]}
        assert [r.finish_reason for r in got] == ["stop" if r.token_ids[-1] in stops else "length" for r in got]
        assert len(got[0].token_ids) == (end + 1 if "min_new_tokens" not in options else len(got[0].token_ids))
        assert got[0].finish_reason == "stop" or "min_new_tokens" in options
    assert len(got[0].token_ids) > end + 1  # min_new_tokens held the EOS back past where it ended row 0 before


def test_repetition_penalty_matches_transformers(setup):
    processor, model, pipe = setup
    conversation = CASES["one image"]
    inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=1.5)
    want = out[0, inputs["input_ids"].shape[1] :].tolist()
    (got,) = pipe.generate(messages=conversation, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=1.5)
    assert got.token_ids == want
    batch = CASES["batch of three"]  # left-padded rows: the padding is not penalized
    got = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=0.7)
    assert [r.token_ids for r in got] == hf_generate(processor, model, batch, repetition_penalty=0.7)
    # Masked tokens after a row's first real one (a hole in the mask) still count, as in transformers: it leaves out
    # only the leading padding. The hole holds the tokens the prompt would be answered with, so counting them shows.
    inputs = processor(text="[INST] Hello there, how many apples? [/INST]", return_tensors="np")
    answer = pipe.generate(**inputs, max_new_tokens=4)[0].token_ids
    ids = inputs["input_ids"]
    holed = np.concatenate([ids[:, :3], np.array([answer]), ids[:, 3:]], axis=1)
    mask = np.ones_like(holed)
    mask[:, 3 : 3 + len(answer)] = 0
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(holed), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=NEW_TOKENS, repetition_penalty=5.0)
    (got,) = pipe.generate(input_ids=holed, attention_mask=mask, max_new_tokens=NEW_TOKENS, repetition_penalty=5.0)
    assert got.token_ids == out[0, holed.shape[1] :].tolist()


def test_no_repeat_ngram_size_matches_transformers(setup):
    """Greedy answers with `no_repeat_ngram_size` as transformers': the prompt's n-grams count (its image tokens and
    a batch row's left padding too, as transformers counts them), and the answer's own. (Other sizes: the
    step-by-step test below.)"""
    processor, model, pipe = setup
    size = 2
    batch = CASES["batch of three"]
    got = [r.token_ids for r in pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, no_repeat_ngram_size=size)]
    assert got == hf_generate(processor, model, batch, no_repeat_ngram_size=size)
    # Where the unconstrained answer repeats an n-gram, the rule must have changed it (else it must not have).
    prompts = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True)["input_ids"]
    free = hf_generate(processor, model, batch)
    binds = any(_repeats_an_ngram(list(prompt), answer, size) for prompt, answer in zip(prompts, free))
    assert (got != free) == binds


def test_logits_processors_match_transformers(setup):
    """Greedy answers with transformers' other logits processors on, all at once, token for token; each chosen to
    bind on the unconstrained answers (a bigram of one banned, a token of another biased away, ...). Then min_length,
    which counts the prompt (the padded batch's width, image tokens included)."""
    processor, model, pipe = setup
    batch = [user(IMAGES[2], "Describe."), user("What is a cat?"), user("Tell me a story about a cat.")]  # (short: left padding, an image)
    free = hf_generate(processor, model, batch)
    a, b, c = free
    eos = pipe.manifest.tokens.eos_token_ids
    forced = next(t for t in range(5, 100) if t not in eos and t not in a + b + c)
    options = dict(
        bad_words_ids=[[a[2], a[3]], [b[4]]], sequence_bias=[[[c[1]], -50.0], [[a[5], a[6]], -50.0], [[b[0]], 0.5]],
        suppress_tokens=[b[1]], begin_suppress_tokens=[c[0]], forced_eos_token_id=forced,
    )
    got = [r.token_ids for r in pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)]
    assert got == hf_generate(processor, model, batch, **options)
    assert all(row[-1] == forced for row in got) and got[2][0] != c[0] and all(b[1] not in row for row in got)

    width = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="np")["input_ids"].shape[1]
    stop = a[3]  # row 0 ends at its 4th token (or earlier, where the token comes before) ...
    end = a.index(stop)
    options = {"eos_token_id": stop, "min_length": width + end + 2}  # ... unless min_length holds it back
    got = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, **options)
    want = hf_generate(processor, model, batch, **options, min_new_tokens=None)  # (one set, even to 0, replaces min_length)
    pad = pipe._special_ids(pipe.settings(**options))[1]
    assert [r.token_ids + [pad] * (len(want[0]) - len(r.token_ids)) for r in got] == want
    assert len(got[0].token_ids) > end + 1


def test_exponential_decay_length_penalty_matches_transformers(setup):
    """Past `start` new tokens the EOS logits grow a factor a token: the answers end where transformers' end, earlier
    than without it."""
    processor, model, pipe = setup
    batch = CASES["batch of three"]
    free = hf_generate(processor, model, batch)
    def first(row: list[int], token: int) -> int:
        return row.index(token) if token in row else len(row)

    stop = max(sorted(set(free[0])), key=lambda token: min(first(row, token) for row in free))  # an EOS every row reaches late, if at all
    options = {"eos_token_id": stop, "min_new_tokens": 0}
    plain = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, **options)
    options["exponential_decay_length_penalty"] = (1, 3.0)
    got = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, **options)
    want = hf_generate(processor, model, batch, **options)
    pad = pipe._special_ids(pipe.settings(**options))[1]
    assert [r.token_ids + [pad] * (len(want[0]) - len(r.token_ids)) for r in got] == want
    if max(len(r.token_ids) for r in plain) > 2:  # (it binds; not where every row ends at once: a model that repeats one token)
        assert sum(len(r.token_ids) for r in got) < sum(len(r.token_ids) for r in plain)


def test_a_generation_config_generates_as_in_transformers(setup):
    """`generation_config=` (a transformers GenerationConfig, or a dict of its fields) as transformers 5 reads it: its
    set fields over the bundle's config, the call's own arguments over it; token for token."""
    import torch
    from transformers import GenerationConfig

    processor, model, pipe = setup
    chat = user(IMAGES[1], "Describe.")
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=1.5, no_repeat_ngram_size=2, do_sample=False)
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for call in ({}, {"repetition_penalty": 1.0, "max_new_tokens": 5}):
        with torch.no_grad():
            want = model.generate(**inputs, generation_config=config, **call)[0, inputs["input_ids"].shape[1] :].tolist()
        assert pipe.generate(messages=chat, generation_config=config, **call).token_ids == want
        as_dict = {k: v for k, v in config.to_dict().items() if v is not None}
        assert pipe.generate(messages=chat, generation_config=as_dict, **call).token_ids == want


def test_beam_search_answers_as_transformers(setup):
    """Beam search's answers token for token, best first: over max_new_tokens (EOS held back), then ending at an EOS
    (one the answers hold, so hypotheses finish at different lengths) under each early_stopping rule and length
    penalty, with a processor (the repetition penalty applies to the log-probabilities) and several answers each."""
    processor, model, pipe = setup
    batch = [user(IMAGES[2], "Describe."), user("Tell me a story about a cat.")]  # (left padding, an image)
    inputs = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    width = inputs["input_ids"].shape[1]
    free = hf_generate(processor, model, batch)
    beams = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, num_beams=3, min_new_tokens=NEW_TOKENS)
    ending = beams[0].token_ids[2]  # an EOS within the best answer: hypotheses end at it, or around it

    def transformers_answers(options):
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, **options)
        eos = options.get("eos_token_id", pipe.manifest.tokens.eos_token_ids)
        eos = {eos} if isinstance(eos, int) else set(eos)
        answers = []
        for row in out[:, width:].tolist():  # (rows end with fill ids after an EOS, or after the longest answer)
            end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            answers.append(row[:end])
        return answers

    ended_early = False
    for options in (
        {"num_beams": 3, "min_new_tokens": NEW_TOKENS},
        {"num_beams": 4, "num_return_sequences": 3, "min_new_tokens": NEW_TOKENS, "repetition_penalty": 1.3},
        {"num_beams": 3, "eos_token_id": ending, "num_return_sequences": 2},
        {"num_beams": 3, "eos_token_id": ending, "early_stopping": True, "length_penalty": 0.0},
        {"num_beams": 2, "eos_token_id": ending, "early_stopping": "never", "length_penalty": 2.0, "num_return_sequences": 2},
    ):
        got = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, **options)
        n = options.get("num_return_sequences", 1)
        flat = [result for answers in got for result in answers] if n > 1 else got
        want = transformers_answers(options)
        assert [r.token_ids for r in flat] == want, options
        assert [r.finish_reason for r in flat] == ["stop" if r.token_ids[-1] == options.get("eos_token_id") else "length" for r in flat]
        ended_early |= any(len(r.token_ids) < NEW_TOKENS for r in flat)
    assert ended_early  # (the check can fail: answers that an EOS ended, at different lengths)
    assert [r.token_ids for r in beams] != free  # (beam search is not greedy search)
    for refused in (lambda: pipe.stream(messages=batch[1], num_beams=2), lambda: pipe.chat(num_beams=2).send("Hi")):
        with pytest.raises(ValueError, match=r"beam search \(num_beams=2\) gives its answers at the end: use Pipeline.generate"):
            refused()


def test_beam_sampling_answers_as_transformers_from_the_same_draws(setup, monkeypatch):
    """Beam sampling (do_sample with num_beams) on the whole model, a padded batch with an image: transformers'
    answers token for token where its torch.multinomial draws from the numbers ortllava's seeded generator gives."""
    processor, model, pipe = setup
    batch = [user(IMAGES[2], "Describe."), user("Tell me a story about a cat.")]
    inputs = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    options = {"num_beams": 3, "num_return_sequences": 2, "temperature": 1.5, "top_k": 40, "min_new_tokens": NEW_TOKENS, "max_new_tokens": NEW_TOKENS}
    greedy = [r.token_ids for answers in pipe.generate(messages=batch, **{**options, "temperature": None, "top_k": None}) for r in answers]
    for seed in range(2):
        draws = SameDraws(seed)
        monkeypatch.setattr(torch, "multinomial", draws)
        with torch.no_grad():
            want = model.generate(**inputs, do_sample=True, **options)[:, inputs["input_ids"].shape[1] :].tolist()
        got = pipe.generate(messages=batch, do_sample=True, seed=seed, **options)
        assert draws.calls == NEW_TOKENS  # (one draw of each prompt's candidates a step)
        assert [r.token_ids for answers in got for r in answers] == want
        assert want != greedy  # (the check can fail: the draws took other continuations than beam search's best)


def _repeats_an_ngram(prompt: list[int], answer: list[int], size: int, of_prompt_only: bool = False) -> bool:
    """Whether one of `answer`'s tokens completes an n-gram that `prompt + answer` held before it (`of_prompt_only`:
    that `prompt` holds)."""
    ids = prompt + answer
    grams = {tuple(ids[i : i + size]) for i in range(len(prompt) - size + 1)}
    for end in range(len(prompt), len(ids)):
        gram = tuple(ids[end - size + 1 : end + 1])
        if gram in grams:
            return True
        if not of_prompt_only:
            grams.add(gram)
    return False


def test_encoder_repetition_penalty_matches_transformers(setup):
    """transformers applies its "encoder" repetition penalty to a decoder-only model's prompt ids (left padding and
    image tokens included): > 1 favours the prompt's tokens, < 1 disfavours them. Greedy answers token for token over
    a padded batch with images, and a penalty changes them (which one does depends on the random model)."""
    processor, model, pipe = setup
    batch = CASES["batch of three"]
    free, changed = hf_generate(processor, model, batch), 0
    for penalty in (5.0, 0.05):
        got = [r.token_ids for r in pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, encoder_repetition_penalty=penalty)]
        assert got == hf_generate(processor, model, batch, encoder_repetition_penalty=penalty), penalty
        changed += got != free
    assert changed


@pytest.mark.parametrize("size", [1, 2])
def test_encoder_no_repeat_ngram_size_matches_transformers(setup, size):
    """transformers' `encoder_no_repeat_ngram_size`, on a decoder-only model's prompt ids: no n-gram of the prompt
    (padding and image tokens included) is repeated; the answer may repeat its own. Greedy answers token for token,
    changed exactly where the unconstrained one repeats a prompt's n-gram."""
    processor, model, pipe = setup
    batch = CASES["batch of three"]
    got = [r.token_ids for r in pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, encoder_no_repeat_ngram_size=size)]
    assert got == hf_generate(processor, model, batch, encoder_no_repeat_ngram_size=size)
    prompts = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True)["input_ids"]
    free = hf_generate(processor, model, batch)
    for prompt, answer, unconstrained in zip(prompts, got, free):
        assert (answer != unconstrained) == _repeats_an_ngram(list(prompt), unconstrained, size, of_prompt_only=True)


def test_guidance_matches_transformers(setup):
    """Classifier-free guidance as transformers gives it to a decoder-only model: greedy answers token for token over a
    padded batch with images, the unconditional pass reading each row's last prompt token, then one negative prompt
    per prompt (text ids, an image token among them); under beam search (transformers never reorders its guidance
    cache); and on rows repeated for num_return_sequences (top_k=1: deterministic sampling). Guidance changes an answer."""
    processor, model, pipe = setup
    batch = CASES["batch of three"]
    inputs = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    width = inputs["input_ids"].shape[1]
    negative = np.random.default_rng(5).integers(3, 100, size=(3, 5))
    negative[1, 2] = pipe.manifest.tokens.image_token_id  # (embedded as a token: the guidance pass encodes no image)
    free = hf_generate(processor, model, batch)
    changed = 0
    for options in (
        {"guidance_scale": 6.0},
        {"guidance_scale": 2.0, "negative_prompt_ids": negative},
        {"guidance_scale": 0.5, "num_beams": 2},  # (transformers fails on negative prompts under beams: 3 rows for 6)
        {"guidance_scale": 2.0, "do_sample": True, "top_k": 1, "num_return_sequences": 2},
    ):
        theirs = {**options, "negative_prompt_ids": torch.tensor(negative)} if "negative_prompt_ids" in options else options
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **{"do_sample": False, **theirs})
        want = [row.tolist() for row in out[:, width:]]
        got = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **options)
        got = [r.token_ids for answers in got for r in (answers if isinstance(answers, list) else [answers])]
        assert got == want, options
        if "num_beams" not in options:  # (beam search's answers differ from greedy ones anyway)
            changed += (got[::2] if "num_return_sequences" in options else got) != free
    assert changed


def test_negative_prompts_of_other_lengths_are_each_their_own(setup):
    """Negative prompts of different lengths, one per prompt (a list of lists: no padding), give each prompt the answer
    transformers gives it alone with its negative prompt; one negative prompt serves every prompt of a batch."""
    processor, model, pipe = setup
    batch = [CASES["one image"][0], CASES["text only"][0]]
    negatives = [[5, 17, 33], [9, 40, 2, 61, 7, 12]]
    got = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, guidance_scale=2.5, negative_prompt_ids=negatives)
    for conversation, negative, result in zip(batch, negatives, got):
        want = hf_generate(processor, model, [conversation], guidance_scale=2.5, negative_prompt_ids=torch.tensor([negative]))
        assert result.token_ids == want[0]
    shared = pipe.generate(messages=batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, guidance_scale=2.5, negative_prompt_ids=negatives[1])
    assert [r.token_ids for r in shared][1] == got[1].token_ids
    # A stream and a chat turn guide as generate does.
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, guidance_scale=2.5, negative_prompt_ids=[negatives[0]])
    chunks = list(pipe.stream(messages=batch[0], **options))
    assert [t for chunk in chunks for t in chunk.token_ids] == got[0].token_ids
    assert pipe.chat(**options).send(batch[1][0]["content"][0]["text"]).token_ids == pipe.generate(messages=batch[1], **options).token_ids


def test_stop_strings_are_matched_across_the_prompts_end_as_transformers(setup):
    """transformers' stop_strings read the whole sequence: a string that begins in the prompt and ends in the first new
    token (with its leading space, which a SentencePiece decode of the answer alone drops) ends the answer there. The
    first token is forced (prefix_allowed_tokens_fn) to a word with a leading space; tokens as transformers', in
    generate and in a stream."""
    processor, model, pipe = setup
    tokenizer = processor.tokenizer
    word = next(
        index for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size))))
        if token[:1] in ("\u2581", "\u0120") and token[1:].isalpha() and len(token) > 2
    )
    prompt = "Tell me a story about a cat."  # (as written: the prompt ends in text, not in a chat template's special token)
    inputs = processor(text=prompt, return_tensors="pt")
    width = inputs["input_ids"].shape[1]
    stop = [". " + tokenizer.decode([word]).strip()[:1]]  # (e.g. ". w": the prompt's last character, a space, the word's first)
    with torch.no_grad():
        out = model.generate(
            **inputs, do_sample=False, max_new_tokens=6, stop_strings=stop, tokenizer=tokenizer,
            prefix_allowed_tokens_fn=lambda batch, ids: [word] if len(ids) == width else list(range(len(tokenizer))),
        )
    want = out[0, width:].tolist()
    first_word = lambda prompt, ids: [word] if len(ids) == width else list(range(pipe.manifest.text.vocab_size))  # noqa: E731
    options = dict(max_new_tokens=6, stop_strings=stop, prefix_allowed_tokens_fn=first_word)
    assert want == [word], (stop, want)
    assert pipe.generate(prompt=prompt, **options).token_ids == want
    assert [t for chunk in pipe.stream(prompt=prompt, **options) for t in chunk.token_ids] == want


def test_num_return_sequences_rows_as_transformers(setup):
    """Each prompt's n answers, in transformers' row order (prompt 0's n rows first), with the repetition penalty
    on each copy's own prompt. top_k=1 makes the sampling deterministic, so tokens compare exactly."""
    processor, model, pipe = setup
    conversations = CASES["batch of three"]
    options = dict(do_sample=True, top_k=1, num_return_sequences=2, repetition_penalty=1.3, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, **options)
    want = [row.tolist() for row in out[:, inputs["input_ids"].shape[1] :]]
    got = pipe.generate(messages=conversations, **options)
    assert [[r.token_ids for r in answers] for answers in got] == [want[0:2], want[2:4], want[4:6]]
    single = pipe.generate(messages=conversations[0], **{**options, "num_return_sequences": 1})
    assert isinstance(single, ortllava.GenerationResult) and single.token_ids == want[0]  # one answer: a result, not a list


def test_num_return_sequences_samples_each_answer_on_its_own(setup):
    _, _, pipe = setup
    options = dict(messages=CASES["one image"][0], do_sample=True, top_k=0, temperature=1.5, max_new_tokens=8, min_new_tokens=8, seed=0)
    decoder = pipe.sessions.decoder
    start, prefilled_rows = decoder.start, []

    def counted_start(inputs_embeds, *args):
        prefilled_rows.append(inputs_embeds.shape[0])
        return start(inputs_embeds, *args)

    decoder.start = counted_start  # (an instance attribute: the fixture's pipe gets the method back below)
    try:
        answers = pipe.generate(num_return_sequences=3, **options)
    finally:
        del decoder.start
    assert prefilled_rows == [1]  # one prefill; its keys/values copied for each answer
    assert isinstance(answers, list) and len(answers) == 3
    assert len({tuple(r.token_ids) for r in answers}) == 3  # (equal ones: 8 tokens drawn alike from a flat distribution)
    assert [r.token_ids for r in pipe.generate(num_return_sequences=3, **options)] == [r.token_ids for r in answers]  # seeded
    # n copies of one prompt are a batch of n of it: the same draws
    batch = pipe.generate(**{**options, "messages": [CASES["one image"][0]] * 3})
    assert [r.token_ids for r in batch] == [r.token_ids for r in answers]
    with pytest.raises(ValueError, match="num_return_sequences"):  # greedy answers would all be one (transformers refuses too)
        pipe.generate(messages=CASES["one image"][0], num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        next(pipe.stream(num_return_sequences=2, **options))
    with pytest.raises(ValueError, match="num_return_sequences"):
        pipe.chat(do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        pipe.chat().send("Hi", do_sample=True, num_return_sequences=2)
    # Only a caller asks for several answers: a generation config's num_return_sequences is not read (its load warns).
    from ortllava.generation.settings import GenerationSettings, unsupported_generation_settings

    config = {"do_sample": True, "num_return_sequences": 3}
    assert GenerationSettings.resolve({}, config).num_return_sequences == 1
    assert unsupported_generation_settings(config) == {"num_return_sequences": 3}


def test_processor_outputs_generate_as_model_generate(setup):
    """`pipe.generate(**inputs)` on transformers' processor outputs (numpy) gives `model.generate(**inputs)`'s new
    tokens: a left-padded batch with images and a text-only row; the same from our own processor's outputs, and
    streamed from one row."""
    processor, model, pipe = setup
    conversations = CASES["batch of three"]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np", padding=True)
    want = hf_generate(processor, model, conversations)
    got = pipe.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in got] == want
    ours = pipe.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True)
    assert [r.token_ids for r in pipe.generate(**ours, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)] == want
    one = {key: value[:1] for key, value in inputs.items()}  # row 0 and its image (image 0)
    (row,) = pipe.generate(**one, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert row.token_ids == want[0]
    assert "".join(c.text for c in pipe.stream(**one, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)) == row.text


def test_max_length_counts_the_prompt_as_transformers(setup, monkeypatch):
    """`max_length` = the padded prompt's tokens (images included) + the new ones, as in transformers' `generate`:
    on a left-padded batch, one row, a chat turn and from the bundle's generation config; `max_new_tokens` wins
    where both are given (with transformers' warning); a prompt that leaves no room is refused, both named."""
    processor, model, pipe = setup
    conversations = CASES["batch of three"]
    length = pipe.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True)["input_ids"].shape[1]
    new = 5
    want = hf_generate(processor, model, conversations, max_new_tokens=None, max_length=length + new, min_new_tokens=new)
    got = pipe.generate(messages=conversations, max_length=length + new, min_new_tokens=new)
    assert [r.token_ids for r in got] == want and {len(r.token_ids) for r in got} == {new}
    assert {r.finish_reason for r in got} == {"length"}
    # One row: its own prompt's length counts.
    one = conversations[1:2]
    own = pipe.processor.apply_chat_template(one[0], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"].shape[1]
    assert own < length
    (row,) = hf_generate(processor, model, one, max_new_tokens=None, max_length=own + new, min_new_tokens=new)
    single = pipe.generate(messages=one[0], max_length=own + new, min_new_tokens=new)
    assert single.token_ids == row and len(row) == new
    assert "".join(c.text for c in pipe.stream(messages=one[0], max_length=own + new, min_new_tokens=new)) == single.text
    # A chat turn counts the whole history, as generate on it; the turn's max_length replaces the session's max_new_tokens.
    chat = pipe.chat(max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "both set" warning: the turn's length replaces the session's
        assert chat.send(one[0][0]["content"][0]["text"], max_length=own + new, min_new_tokens=new).token_ids == single.token_ids
    # The bundle's generation config: its max_length applies where no length is given; a caller's length wins.
    monkeypatch.setitem(pipe.generation_config, "max_length", own + new)
    assert pipe.generate(messages=one[0], min_new_tokens=new).token_ids == single.token_ids
    assert len(pipe.generate(messages=one[0], max_new_tokens=2).token_ids) == 2
    monkeypatch.delitem(pipe.generation_config, "max_length")
    with pytest.warns(UserWarning, match="`max_new_tokens` will take precedence"):
        assert len(pipe.generate(messages=one[0], max_new_tokens=3, min_new_tokens=3, max_length=own + new).token_ids) == 3
    with pytest.raises(ValueError, match=f"Input length of input_ids is {length}.*`max_length` is set to {length}"):
        pipe.generate(messages=conversations, max_length=length)


def test_output_logits_are_transformers_logits(setup):
    """`output_logits=True` keeps, per answer, the raw logits each new token was picked from: transformers'
    `output_logits` row for row (a left-padded batch; min_new_tokens and the repetition penalty, which change what
    is sampled from, not these), to float tolerance; the same from a chat turn; refused in streams."""
    processor, model, pipe = setup
    conversations = CASES["batch of three"]
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=1.3)
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, output_logits=True, return_dict_in_generate=True, **options)
    want = torch.stack(out.logits, dim=1).numpy()  # [B, new tokens, V]
    got = pipe.generate(messages=conversations, output_logits=True, **options)
    assert [r.token_ids for r in got] == out.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    for row, result in enumerate(got):
        assert result.logits.shape == (NEW_TOKENS, want.shape[-1]) and result.logits.dtype == np.float32
        np.testing.assert_allclose(result.logits, want[row], rtol=1e-4, atol=1e-4 * np.abs(want[row]).max())
    assert pipe.generate(messages=conversations[0], max_new_tokens=2).logits is None  # only when asked
    # A row that ends early keeps the logits of its own tokens only (EOS: row 0's 4th token); sampled, they are the
    # same raw logits (what the sampler changes, it changes on a copy).
    eos = int(got[0].token_ids[3])
    ended = pipe.generate(messages=conversations, output_logits=True, eos_token_id=eos, max_new_tokens=NEW_TOKENS, repetition_penalty=1.3)
    assert [len(r.logits) for r in ended] == [len(r.token_ids) for r in ended] and len(ended[0].token_ids) <= 4
    np.testing.assert_array_equal(ended[0].logits, got[0].logits[: len(ended[0].token_ids)])
    sampled = pipe.generate(messages=conversations, output_logits=True, do_sample=True, seed=0, **options)
    np.testing.assert_array_equal(np.stack([r.logits[0] for r in sampled]), np.stack([r.logits[0] for r in got]))
    chat = pipe.chat(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, repetition_penalty=1.3)
    turn = chat.send(conversations[0][0]["content"][1]["text"], images=[IMAGES[1]], output_logits=True)
    np.testing.assert_allclose(turn.logits, want[0], rtol=1e-4, atol=1e-4 * np.abs(want[0]).max())
    with pytest.raises(ValueError, match="output_logits"):
        next(pipe.stream(messages=conversations[0], output_logits=True))
    with pytest.raises(ValueError, match="output_logits"):
        next(chat.stream("More.", output_logits=True))


def test_a_final_assistant_message_is_continued(setup):
    """`generate(messages=...)` continues a chat that ends with an assistant message, as transformers' pipeline
    does (the template's `continue_final_message`), rather than opening a new assistant turn after it."""
    processor, model, pipe = setup
    conversation = [*CASES["one image"][0], {"role": "assistant", "content": [{"type": "text", "text": "The image shows"}]}]
    inputs = processor.apply_chat_template(conversation, continue_final_message=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    got = pipe.generate(messages=conversation, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert got.token_ids == out[0, inputs["input_ids"].shape[1] :].tolist()


def test_generation_settings_resolve_given_then_config_then_defaults():
    from ortllava.generation.settings import GENERATION_ARGUMENTS, GenerationSettings
    from ortllava.hf_pipeline import GENERATION_KEYS

    config = {"max_new_tokens": 40, "do_sample": True, "top_k": 5, "temperature": 0.7, "seed": 3, "eos_token_id": 2}
    settings = GenerationSettings.resolve({"temperature": 0.2, "top_k": None, "stop": "###"}, config)
    assert (settings.max_new_tokens, settings.do_sample, settings.top_k) == (40, True, 5)  # from the config
    assert settings.temperature == 0.2 and settings.stop == ("###",)  # given; one stop string becomes a tuple
    assert settings.seed is None and settings.top_p == 1.0 and settings.min_new_tokens == 0  # "seed" is not read from a config
    with pytest.raises(TypeError, match=r"transformers' num_beam_groups=2: not implemented by ortllava.*diverse beam search is not implemented"):
        GenerationSettings.resolve({"num_beam_groups": 2}, config)
    # transformers' arguments at values where they do nothing are taken, so code written for it runs unchanged.
    no_ops = {"num_beams": 1, "use_cache": True, "length_penalty": 1.0, "streamer": None, "return_dict_in_generate": False, "typical_p": 1.0}
    assert GenerationSettings.resolve(no_ops, config) == GenerationSettings.resolve({}, config)
    assert GenerationSettings.resolve({"bos_token_id": 1, "generation_config": {"bos_token_id": np.int64(1), "_from_model_config": True}}, config) == GenerationSettings.resolve({}, config)
    # A caller's GenerationConfig: fields that choose how transformers runs are taken; a config's max_length (a model's
    # context, say) is held to the positions served, as the bundle's is, while a max_length named in the call is not.
    from transformers import GenerationConfig

    runs = GenerationConfig(cache_implementation="static", disable_compile=True, num_assistant_tokens=5, max_new_tokens=7)
    assert GenerationSettings.resolve({"generation_config": runs}, config).max_new_tokens == 7
    assert GenerationSettings.resolve({"generation_config": {"max_length": 10**5}}, {}, 4096).max_length == 4097
    assert GenerationSettings.resolve({"max_length": 10**5}, {}, 4096).max_length == 10**5  # (refused later, at the prompt: ContextLengthError)
    with pytest.raises(TypeError, match=r"prompt_lookup_num_tokens=10: not implemented"):
        GenerationSettings.resolve({"generation_config": GenerationConfig(prompt_lookup_num_tokens=10)}, {})
    with pytest.raises(TypeError, match=r"unknown generation argument.*: max_new_token \(max_new_token: did you mean max_new_tokens"):
        GenerationSettings.resolve({"max_new_token": None}, {})  # (a misspelt name, even unset)
    for bad, message in (({"use_cache": False}, "use_cache=False: not implemented"), ({"num_beam_groups": True}, "num_beam_groups=True"),
                         ({"max_new_token": 5}, r"unknown generation argument.*: max_new_token \(max_new_token: did you mean max_new_tokens"),
                         ({"force_words_ids": np.array([[1, 2]])}, r"force_words_ids=array\(\[\[1, 2\]\]\): not implemented"),
                         ({"generation_config": list(range(50))}, r"generation_config must be a transformers GenerationConfig or a dict of its fields, got <list>"),
                         ({"generation_config": {"num_beam_groups": 2}}, r"num_beam_groups=2: not implemented"),
                         ({"generation_config": {"max_new_token": 5}}, r"unknown generation argument.*: max_new_token \(max_new_token: did you mean max_new_tokens")):
        with pytest.raises(TypeError, match=message):
            GenerationSettings.resolve(bad, {})
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings.resolve({"max_new_tokens": 0}, {})
    # A bad value is an error naming it, not a traceback later nor a silently different setting.
    for bad in ({"top_k": -1}, {"top_k": 2.5}, {"temperature": 0}, {"top_p": 1.5}, {"do_sample": "no"}):
        with pytest.raises(ValueError, match=next(iter(bad)) if "do_sample" not in bad else "do_sample"):
            GenerationSettings.resolve({"do_sample": True, **bad}, {})
    assert GenerationSettings.resolve({}, config).eos_token_id == 2  # transformers' generate arguments, from the config too
    assert GenerationSettings.resolve({"eos_token_id": [2, 7]}, config).eos_token_id == (2, 7)
    for bad in ({"max_new_tokens": 2.5}, {"min_new_tokens": -1}, {"repetition_penalty": 0}, {"seed": "x"}, {"stop": [""]}, {"stop": 3},
                {"eos_token_id": -1}, {"eos_token_id": [2, "x"]}, {"pad_token_id": 1.5}, {"max_length": 1}, {"max_length": 9.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationSettings.resolve(bad, {})
    assert GenerationSettings.resolve({"temperature": 0}, {}).temperature == 0  # greedy: the warpers are not used
    # max_length, where in force, decides max_new_tokens per prompt: given, or from a config without max_new_tokens.
    assert GenerationSettings.resolve({"max_length": 50}, config).max_new_tokens is None  # the caller's length wins
    assert GenerationSettings.resolve({"max_length": 50}, {}).for_prompt(20).max_new_tokens == 30
    assert GenerationSettings.resolve({}, {"max_length": 50}).max_length == 50
    assert GenerationSettings.resolve({}, {"max_length": 50, "max_new_tokens": 9}) == GenerationSettings.resolve({"max_new_tokens": 9}, {})
    # A config's max_length (a model's whole context, say) is held to what the decoder serves; a caller's is not.
    assert GenerationSettings.resolve({}, {"max_length": 10**6}, max_positions=100).max_length == 101
    assert GenerationSettings.resolve({"max_length": 10**6}, {}, max_positions=100).max_length == 10**6
    # one list of arguments: the HF-style pipeline takes the same ones (stop strings as its stop_sequence)
    assert set(GENERATION_KEYS) | {"stop", "output_logits"} == set(GENERATION_ARGUMENTS)
