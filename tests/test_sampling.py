"""Logits processors and sampling warpers against transformers' own, on random logits (no model): the scores each
step's sampler sees, step by step over a growing history, and the candidates a sampler draws from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor, EncoderRepetitionPenaltyLogitsProcessor, EpsilonLogitsWarper, EtaLogitsWarper, ForcedEOSTokenLogitsProcessor, LogitsProcessorList, MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor, MinPLogitsWarper, NoBadWordsLogitsProcessor, NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor, SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper,
)

from ortllava.generation.logits_processors import for_settings, with_processors
from ortllava.generation.sampling import candidate_probs, draw_without_replacement, make_sampler, warped_scores
from ortllava.generation.settings import GenerationSettings

VOCAB, PROMPT, STEPS, EOS = 12, 20, 15, [3]  # a small vocabulary, so n-grams and sequences recur


def _same_scores_step_by_step(settings: dict, reference, seed: int = 0, prompt_ids: np.ndarray | None = None, mask: np.ndarray | None = None) -> int:
    """Runs ortllava's processors for `settings` and transformers' `reference` (a LogitsProcessorList) over 3 rows for
    STEPS steps, each on fresh random logits, the history growing by the tokens drawn (at random among the allowed
    ones, so answers go on repeating prefixes); asserts the sampler saw transformers' scores at each step. Returns
    how many scores the processors changed, so a caller can check that they bound."""
    rng = np.random.default_rng(seed)
    ids = prompt_ids if prompt_ids is not None else rng.integers(0, VOCAB, size=(3, PROMPT))
    mask = mask if mask is not None else np.ones_like(ids)
    run_settings = GenerationSettings.resolve({"max_new_tokens": STEPS, **settings}, {})
    seen: list[np.ndarray] = []

    def capture(scores):
        seen.append(scores.copy())
        return np.array([rng.choice(np.flatnonzero(np.isfinite(row))) if np.isfinite(row).any() else 0 for row in scores])

    sample = with_processors(capture, for_settings(run_settings, ids, mask, EOS, VOCAB))
    changed = 0
    for _ in range(STEPS):
        logits = rng.standard_normal((3, VOCAB)).astype(np.float32)
        tokens = sample(logits)
        want = reference(torch.tensor(ids), torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(seen[-1], want)
        changed += int((want != logits).sum())
        ids = np.concatenate([ids, tokens[:, None]], axis=1)
    return changed


# (settings, transformers' processors). Sequences drawn from the small vocabulary, so prefixes match often.
PROCESSORS = {
    "repetition penalty": ({"repetition_penalty": 1.3}, [RepetitionPenaltyLogitsProcessor(1.3)]),
    "repetition penalty < 1": ({"repetition_penalty": 0.7}, [RepetitionPenaltyLogitsProcessor(0.7)]),
    "bad words": ({"bad_words_ids": [[5], [1, 2], [7, 7, 8], [3]]}, [NoBadWordsLogitsProcessor([[5], [1, 2], [7, 7, 8], [3]], EOS)]),
    "sequence bias": (
        {"sequence_bias": [[[4], 2.5], [[1, 2], -3.0], [[9, 2], 1.5], [[6, 0, 11], -1.0], [[4], -0.5]]},
        [SequenceBiasLogitsProcessor([[[4], 2.5], [[1, 2], -3.0], [[9, 2], 1.5], [[6, 0, 11], -1.0], [[4], -0.5]])],
    ),
    "min_new_tokens": ({"min_new_tokens": 4}, [MinNewTokensLengthLogitsProcessor(PROMPT, 4, EOS)]),
    "min_length": ({"min_length": PROMPT + 6}, [MinLengthLogitsProcessor(PROMPT + 6, EOS)]),
    "forced eos": ({"forced_eos_token_id": [2, 9]}, [ForcedEOSTokenLogitsProcessor(PROMPT + STEPS, [2, 9])]),
    "suppress tokens": ({"suppress_tokens": [0, 6, 6]}, [SuppressTokensLogitsProcessor([0, 6, 6])]),
    "begin suppress tokens": ({"begin_suppress_tokens": [1, 10]}, [SuppressTokensAtBeginLogitsProcessor([1, 10], PROMPT)]),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_each_processor_changes_the_scores_as_transformers(name):
    settings, reference = PROCESSORS[name]
    assert _same_scores_step_by_step(settings, LogitsProcessorList(reference)) > 0  # (the check can fail)


def test_processors_together_apply_in_transformers_order():
    """All at once, in the order transformers' generate builds them: a bias, then a penalty that scales it, then bans."""
    settings = {
        "sequence_bias": [[[4], 2.5], [[1, 2], -3.0]], "repetition_penalty": 1.4, "no_repeat_ngram_size": 3,
        "bad_words_ids": [[8, 8]], "min_length": PROMPT + 3, "forced_eos_token_id": 3,
        "suppress_tokens": [6], "begin_suppress_tokens": [4],
    }
    reference = LogitsProcessorList([
        SequenceBiasLogitsProcessor([[[4], 2.5], [[1, 2], -3.0]]), RepetitionPenaltyLogitsProcessor(1.4), NoRepeatNGramLogitsProcessor(3),
        NoBadWordsLogitsProcessor([[8, 8]], EOS), MinLengthLogitsProcessor(PROMPT + 3, EOS),
        ForcedEOSTokenLogitsProcessor(PROMPT + STEPS, 3), SuppressTokensLogitsProcessor([6]), SuppressTokensAtBeginLogitsProcessor([4], PROMPT),
    ])
    for seed in range(3):
        assert _same_scores_step_by_step(settings, reference, seed) > 0


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_leaves_the_padding_out_as_transformers(penalty):
    """Row 1 is left-padded with the pad id 0, which it holds nowhere else and which scores high: transformers
    leaves the padding out of what was seen, and so must we."""
    pad = 0
    ids = np.random.default_rng(1).integers(1, VOCAB, size=(3, PROMPT))
    ids[1, :5] = pad
    mask = (ids != pad).astype(np.int64)
    reference = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.tensor(mask).argmax(1))
    seen = {}

    def capture(scores):
        seen["scores"] = scores.copy()
        return scores.argmax(-1)

    logits = np.random.default_rng(0).standard_normal((3, VOCAB)).astype(np.float32)
    logits[:, pad] = 2.0
    settings = GenerationSettings.resolve({"repetition_penalty": penalty}, {})
    with_processors(capture, for_settings(settings, ids, mask, EOS, VOCAB))(logits)
    np.testing.assert_array_equal(seen["scores"], reference(torch.tensor(ids), torch.tensor(logits)).numpy())
    assert seen["scores"][1, pad] == 2.0  # untouched: row 1 holds the pad id only as padding


def test_repetition_penalty_skips_prompt_ids_past_the_logits_as_transformers():
    """Ids past the logits' width (an embedding table larger than the lm_head) have no logit to penalize; the last
    token, which the prompts do not hold, must stay untouched."""
    ids = np.random.default_rng(2).integers(0, VOCAB + 3, size=(3, PROMPT))
    ids[ids == VOCAB - 1] = VOCAB + 1
    assert _same_scores_step_by_step({"repetition_penalty": 1.3}, LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)]), 0, prompt_ids=ids) > 0


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_no_repeat_ngrams_forbid_what_transformers_forbids(size):
    """Some prompt ids lie past the logits' width, as transformers allows."""
    changed = 0
    for seed in range(4):
        ids = np.random.default_rng(100 + seed).integers(0, VOCAB + 3, size=(3, PROMPT))
        changed += _same_scores_step_by_step({"no_repeat_ngram_size": size}, NoRepeatNGramLogitsProcessor(size), seed, prompt_ids=ids)
    assert changed > 0


# transformers' "encoder" processors, given a decoder-only model's prompt ids: (settings, the reference for a prompt)
PROMPT_PROCESSORS = {
    "encoder repetition penalty": ({"encoder_repetition_penalty": 1.4}, lambda prompt: EncoderRepetitionPenaltyLogitsProcessor(1.4, prompt)),
    "encoder repetition penalty < 1": ({"encoder_repetition_penalty": 0.6}, lambda prompt: EncoderRepetitionPenaltyLogitsProcessor(0.6, prompt)),
    **{
        f"encoder no repeat {n}-grams": ({"encoder_no_repeat_ngram_size": n}, lambda prompt, n=n: EncoderNoRepeatNGramLogitsProcessor(n, prompt))
        for n in (1, 2, 3)
    },
}


@pytest.mark.parametrize("name", sorted(PROMPT_PROCESSORS))
def test_prompt_processors_change_the_scores_as_transformers(name):
    """Their rule reads the prompt only: the answer's tokens never join it (an answer may repeat itself)."""
    settings, reference = PROMPT_PROCESSORS[name]
    changed = 0
    for seed in range(3):
        ids = np.random.default_rng(200 + seed).integers(0, VOCAB, size=(3, PROMPT // 2))
        changed += _same_scores_step_by_step(settings, LogitsProcessorList([reference(torch.tensor(ids))]), seed, prompt_ids=ids)
    assert changed > 0


@pytest.mark.parametrize("name", sorted(PROMPT_PROCESSORS))
def test_prompt_processors_follow_beams_as_transformers(name):
    """One prompt's 4 beams, reordered and continued at random: transformers keeps the prompt's rule by row position
    and reads each row's last ids, which beam search reorders; so must we."""
    settings, reference = PROMPT_PROCESSORS[name]
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, VOCAB, size=(1, 8))
    history = np.repeat(prompt, 4, axis=0)
    processors = for_settings(GenerationSettings.resolve(settings, {}), history, np.ones_like(history), EOS, VOCAB)
    theirs, changed = reference(torch.tensor(prompt)), 0
    for _ in range(12):
        logits = rng.standard_normal((4, VOCAB)).astype(np.float32)
        got = logits.copy()
        for process in processors:
            process(got)
        want = theirs(torch.tensor(history), torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(got, want)
        changed += int((want != logits).sum())
        rows, tokens = rng.integers(0, 4, size=4), rng.integers(0, VOCAB, size=4)
        for process in processors:
            process.reorder(rows)
            process.picked(tokens)
        history = np.concatenate([history[rows], tokens[:, None]], axis=1)
    assert changed > 0


def test_processors_leave_the_raw_logits_alone_and_cost_nothing_when_off():
    """The decoder's logits buffer stays raw (output_logits reads it), and with nothing on the sampler is the bare one."""
    ids = np.zeros((1, 4), np.int64)
    assert with_processors(make_sampler(), for_settings(GenerationSettings(), ids, np.ones_like(ids), EOS, VOCAB)) is make_sampler()
    settings = GenerationSettings.resolve({"suppress_tokens": [5], "repetition_penalty": 2.0}, {})
    sample = with_processors(make_sampler(), for_settings(settings, ids, np.ones_like(ids), EOS, VOCAB))
    logits = np.arange(VOCAB, dtype=np.float32)[None] - 5  # token 5 scores 0 and token 0 (in the prompt) -5
    raw = logits.copy()
    assert sample(logits).tolist() == [11]
    np.testing.assert_array_equal(logits, raw)


@pytest.mark.parametrize("bad, message", [
    ({"bad_words_ids": [[1, 2], 3]}, "bad_words_ids must be a non-empty list of non-empty lists of token ids"),
    ({"bad_words_ids": [[1, -2]]}, "bad_words_ids must be"),
    ({"bad_words_ids": [[]]}, "bad_words_ids must be"),
    ({"sequence_bias": [[[1, 2]]]}, r"sequence_bias must be a non-empty list of \[token ids, bias\] pairs"),
    ({"sequence_bias": {(1,): "x"}}, "sequence_bias must be"),
    ({"sequence_bias": [[[1], float("nan")]]}, "sequence_bias must be"),
    ({"sequence_bias": [[[1], float("inf")]]}, r"each bias a number \(or -inf: never\)"),
    ({"suppress_tokens": [1, "a"]}, "suppress_tokens must be a list of token ids"),
    ({"begin_suppress_tokens": 4}, "begin_suppress_tokens must be a list of token ids"),
    ({"forced_eos_token_id": [-1]}, "forced_eos_token_id must be a token id or a list of them"),
    ({"min_length": -1}, "min_length must be an integer >= 0"),
    ({"do_sample": True, "typical_p": 0}, r"typical_p must be a number in \(0, 1\]"),
    ({"do_sample": True, "epsilon_cutoff": 1.0}, r"epsilon_cutoff must be a number in \[0, 1\)"),
    ({"do_sample": True, "eta_cutoff": -0.1}, r"eta_cutoff must be a number in \[0, 1\)"),
    ({"num_beams": 0}, "num_beams must be an integer >= 1"),
    ({"num_beams": True}, "num_beams must be an integer >= 1"),
    ({"num_beams": 2, "num_return_sequences": 3}, r"`num_return_sequences` \(3\) has to be smaller or equal to `num_beams` \(2\)"),
    ({"num_beams": 2, "stop": "x"}, r"stop strings: not implemented for beam search \(num_beams=2\)"),
    ({"num_beams": 2, "output_logits": True}, "output_logits: not implemented for beam search"),
    ({"length_penalty": "long"}, "length_penalty must be a number"),
    ({"early_stopping": "sometimes"}, 'early_stopping must be True, False or "never"'),
    ({"guidance_scale": "strong"}, r"guidance_scale must be a number \(1: no guidance\)"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be a number"),
    ({"guidance_scale": 2, "negative_prompt_ids": [[1, -2]]}, "negative_prompt_ids must be token ids, a list of them for each prompt"),
    ({"guidance_scale": 2, "negative_prompt_ids": []}, "negative_prompt_ids must be token ids"),
    ({"guidance_scale": 2, "negative_prompt_ids": [[1, 2], []]}, r"negative_prompt_ids must be token ids, .*\(each non-empty\)"),
    ({"guidance_scale": 2, "negative_prompt_ids": "a text"}, "negative_prompt_ids must be token ids"),
    ({"guidance_scale": 2, "negative_prompt_ids": [[1, 2]], "negative_prompt_attention_mask": [[1]]}, "negative_prompt_attention_mask must have negative_prompt_ids' shape"),
    ({"guidance_scale": 2, "negative_prompt_ids": [[1, 2]], "negative_prompt_attention_mask": [[0, 1]]},
     "negative_prompt_attention_mask pads a negative prompt: .* give negative_prompt_ids as a list of id lists, one per prompt"),
    ({"guidance_scale": 2, "negative_prompt_attention_mask": [[1, 1]]}, "negative_prompt_attention_mask was given without negative_prompt_ids"),
])
def test_a_bad_generation_argument_is_an_error_naming_it(bad, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings.resolve(bad, {})


def test_negative_prompts_take_transformers_forms():
    """negative_prompt_ids as transformers takes them (a tensor or array [B, T], with an unpadded mask), as one list of
    ids, or as a list per prompt of any lengths; given without guidance, they are warned of, as doing nothing."""
    import torch

    for given in ([5, 6], [[5, 6]], np.array([5, 6]), np.array([[5, 6]]), torch.tensor([[5, 6]]), [np.array([5, 6])], list(np.array([5, 6]))):
        assert GenerationSettings.resolve({"guidance_scale": 2, "negative_prompt_ids": given}, {}).negative_prompt_ids == ((5, 6),)
    ragged = GenerationSettings.resolve({"guidance_scale": 2, "negative_prompt_ids": [[1], (2, 3)]}, {})
    assert ragged.negative_prompt_ids == ((1,), (2, 3))
    masked = GenerationSettings.resolve({"guidance_scale": 2, "negative_prompt_ids": torch.tensor([[4, 5]]), "negative_prompt_attention_mask": torch.ones(1, 2, dtype=torch.long)}, {})
    assert masked.negative_prompt_ids == ((4, 5),) and masked.negative_prompt_attention_mask is None
    for mask in (torch.ones(1, 2, dtype=torch.bool), [[1.0, 1.0]]):  # (masks as tokenizers and callers make them)
        assert GenerationSettings.resolve({"guidance_scale": 2, "negative_prompt_ids": [[4, 5]], "negative_prompt_attention_mask": mask}, {}).negative_prompt_ids == ((4, 5),)
    with pytest.warns(UserWarning, match=r"negative_prompt_ids does nothing without guidance_scale"):
        GenerationSettings.resolve({"negative_prompt_ids": [5, 6]}, {})
    # A generation config's guidance_scale applies (transformers' field); negative prompts are the caller's only.
    assert GenerationSettings.resolve({}, {"guidance_scale": 1.5, "negative_prompt_ids": [[1]]}).guidance_scale == 1.5
    assert GenerationSettings.resolve({}, {"guidance_scale": 1.5, "negative_prompt_ids": [[1]]}).negative_prompt_ids is None


def test_processor_arguments_take_transformers_forms_and_empty_ones_do_nothing():
    as_list = GenerationSettings.resolve({"sequence_bias": [[[1, 2], -1.0], [[3], 2]]}, {}).sequence_bias
    as_dict = GenerationSettings.resolve({"sequence_bias": {(1, 2): -1.0, (3,): 2.0}}, {}).sequence_bias
    assert as_list == as_dict == (((1, 2), -1.0), ((3,), 2.0))
    assert GenerationSettings.resolve({"bad_words_ids": np.array([[1, 2]])}, {}).bad_words_ids == ((1, 2),)
    empty = {"bad_words_ids": [], "sequence_bias": {}, "suppress_tokens": [], "begin_suppress_tokens": []}
    assert GenerationSettings.resolve(empty, {}) == GenerationSettings.resolve({}, {})
    ids = np.zeros((1, 4), np.int64)
    with pytest.raises(ValueError, match=r"vocabulary has 12 tokens, but these are biased or banned: \[12, 40\]"):
        for_settings(GenerationSettings.resolve({"bad_words_ids": [[40], [1, 12]]}, {}), ids, np.ones_like(ids), EOS, VOCAB)
    with pytest.raises(ValueError, match="forced_eos_token_id 12 is not in the model's vocabulary of 12"):
        for_settings(GenerationSettings.resolve({"forced_eos_token_id": 12}, {}), ids, np.ones_like(ids), EOS, VOCAB)
    # Suppressed ids past the vocabulary suppress nothing, as in transformers (its mask covers the vocabulary only).
    (suppress,) = for_settings(GenerationSettings.resolve({"suppress_tokens": [2, 40]}, {}), ids, np.ones_like(ids), EOS, VOCAB)
    scores = np.zeros((1, VOCAB), np.float32)
    suppress(scores)
    assert np.isinf(scores).sum() == 1 and np.isinf(scores[0, 2])
    # min_new_tokens, once set (to 0 too), replaces min_length, as in transformers (which warns where a caller gives both).
    with pytest.warns(UserWarning, match="Both `min_new_tokens`"):
        assert GenerationSettings.resolve({"min_new_tokens": 0, "min_length": 50}, {}).min_length == 0
    with pytest.warns(UserWarning, match="Both `min_new_tokens`"):  # (wherever each came from)
        assert GenerationSettings.resolve({"min_length": 50}, {"min_new_tokens": 2}).min_length == 0
    assert GenerationSettings.resolve({"min_length": 50}, {}).min_length == 50
    # A bad word that is one EOS token is left out, as transformers leaves it: the answer can still end.
    assert for_settings(GenerationSettings.resolve({"bad_words_ids": [EOS]}, {}), ids, np.ones_like(ids), EOS, VOCAB) == []


WARPERS = [  # (vocab, temperature, top_k, top_p, min_p, more)
    (32000, 0.7, 50, 1.0, 0.0, {}), (32000, 1.3, 50, 0.9, 0.0, {}), (32000, 1.0, 0, 0.8, 0.0, {}), (152064, 0.9, 0, 0.95, 0.0, {}),
    (600, 1.0, 600, 0.5, 0.0, {}), (600, 2.0, 5, 0.3, 0.0, {}), (32000, 1.0, 0, 1.0, 0.05, {}), (32000, 0.8, 50, 0.9, 0.2, {}),
    (600, 1.5, 0, 1.0, 0.5, {}), (32000, 1.0, 0, 1.0, 0.0, {"typical_p": 0.9}), (32000, 0.8, 50, 1.0, 0.0, {"typical_p": 0.5}),
    (600, 1.2, 0, 0.95, 0.0, {"typical_p": 0.3}), (32000, 4.0, 0, 1.0, 0.0, {"typical_p": 0.7}),  # (flat: a fine mass boundary)
    (32000, 1.0, 0, 1.0, 0.0, {"epsilon_cutoff": 3e-4}),
    (32000, 1.0, 50, 1.0, 0.0, {"epsilon_cutoff": 0.02}), (32000, 1.0, 0, 1.0, 0.0, {"eta_cutoff": 2e-3}),
    (600, 0.7, 0, 1.0, 0.0, {"eta_cutoff": 0.05}), (32000, 1.0, 0, 0.95, 0.0, {"typical_p": 0.95, "epsilon_cutoff": 1e-4, "eta_cutoff": 1e-3}),
]


@pytest.mark.parametrize("vocab, temperature, top_k, top_p, min_p, more", WARPERS)
def test_sampling_candidates_follow_transformers_warpers(vocab, temperature, top_k, top_p, min_p, more):
    """The tokens a sampler may draw and their probabilities are those of transformers' temperature, top-k, top-p,
    min-p, typical-p, epsilon and eta warpers then softmax (ties at the top-k boundary kept)."""
    rng = np.random.default_rng(vocab + top_k + len(more))
    logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
    if top_p == 1.0 and not more:  # ties straddling the top-k boundary (top-p's boundary would cut ties in any order)
        logits[rng.choice(vocab, 60, replace=False)] = np.sort(logits)[-40]
    if top_k == 5:  # tokens forbidden as min_new_tokens forbids EOS, fewer finite ones than top_k
        logits[:] = -np.inf
        logits[[7, 8, 9]] = [1.0, 2.0, 3.0]
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    warpers += [MinPLogitsWarper(min_p)] if min_p else []
    warpers += [TypicalLogitsWarper(more["typical_p"])] if "typical_p" in more else []
    warpers += [EpsilonLogitsWarper(more["epsilon_cutoff"])] if "epsilon_cutoff" in more else []
    warpers += [EtaLogitsWarper(more["eta_cutoff"])] if "eta_cutoff" in more else []
    warped = LogitsProcessorList(warpers)(torch.zeros((1, 1), dtype=torch.long), torch.from_numpy(logits)[None])
    want = torch.softmax(warped.double(), dim=-1)[0].numpy()
    candidates, probs = candidate_probs(logits, temperature, top_k, top_p, min_p, **more)
    if min_p or more:  # (the check can fail: these warpers cut tokens the others keep)
        assert len(candidates) < len(candidate_probs(logits, temperature, top_k, top_p)[0])
    assert candidates.tolist() == np.flatnonzero(want > 0).tolist()
    np.testing.assert_allclose(probs, want[candidates], rtol=1e-5, atol=1e-9)


def test_top_k_from_chunk_maxima_keeps_what_a_whole_partition_keeps():
    """`_top_k` looks for the k-th largest score only among those reaching the least of k chunk maxima: the tokens it
    keeps must be the definition's (every score reaching the k-th largest of all), for any vocabulary and k, with
    ties at the boundary, and with -inf filling whole chunks (min_new_tokens and bans forbid tokens so)."""
    from ortllava.generation.sampling import _top_k

    rng = np.random.default_rng(0)
    for case in range(2000):
        vocab = int(rng.integers(1, 300))
        top_k = int(rng.integers(0, vocab + 2))
        if case % 4 == 0:
            scores = rng.standard_normal(vocab)
        elif case % 4 == 1:  # many ties
            scores = rng.integers(-3, 3, vocab).astype(np.float64)
        else:  # most tokens forbidden, scattered or in a block
            scores = rng.standard_normal(vocab)
            scores[rng.random(vocab) < 0.7 if case % 4 == 2 else np.arange(vocab) >= max(1, vocab // 10)] = -np.inf
        scores = scores.astype(np.float32)
        want = np.flatnonzero(scores >= np.partition(scores, -top_k)[-top_k]) if 0 < top_k < vocab else np.arange(vocab)
        assert _top_k(scores, top_k).tolist() == want.tolist(), (case, vocab, top_k)


MIN_KEEP_WARPERS = [  # (temperature, top_k, top_p, min_p, more): each alone would keep fewer than 3 tokens of a peaked row
    (1.0, 1, 1.0, 0.0, {}), (0.7, 0, 0.5, 0.0, {}), (1.0, 0, 1.0, 0.5, {}), (1.0, 0, 1.0, 0.0, {"typical_p": 0.2}),
    (1.0, 0, 1.0, 0.0, {"epsilon_cutoff": 0.1}), (1.0, 0, 1.0, 0.0, {"eta_cutoff": 0.2}),
]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p, more", MIN_KEEP_WARPERS)
def test_beam_sampling_warpers_keep_as_many_tokens_as_transformers(temperature, top_k, top_p, min_p, more):
    """With `min_keep` (transformers' `min_tokens_to_keep`, which beam sampling sets to one more than the EOS ids),
    each warper keeps transformers' tokens, and `warped_scores` gives transformers' warped scores."""
    rng = np.random.default_rng(len(more) + top_k)
    logits = (rng.standard_normal((2, 600)) * 2).astype(np.float32)
    logits[:, 17] += 12.0  # one token takes nearly all the mass
    keep = 3
    warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + ([TopKLogitsWarper(top_k, min_tokens_to_keep=keep)] if top_k else [])
    warpers += [TopPLogitsWarper(top_p, min_tokens_to_keep=keep)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p, min_tokens_to_keep=keep)] if min_p else []
    warpers += [TypicalLogitsWarper(more["typical_p"], min_tokens_to_keep=keep)] if "typical_p" in more else []
    warpers += [EpsilonLogitsWarper(more["epsilon_cutoff"], min_tokens_to_keep=keep)] if "epsilon_cutoff" in more else []
    warpers += [EtaLogitsWarper(more["eta_cutoff"], min_tokens_to_keep=keep)] if "eta_cutoff" in more else []
    want = LogitsProcessorList(warpers)(torch.zeros((2, 1), dtype=torch.long), torch.from_numpy(logits)).numpy()
    got = warped_scores(logits, temperature, top_k, top_p, min_p, more.get("typical_p", 1.0), more.get("epsilon_cutoff", 0.0), more.get("eta_cutoff", 0.0), keep)
    for row in range(2):
        assert np.flatnonzero(np.isfinite(got[row])).tolist() == np.flatnonzero(np.isfinite(want[row])).tolist()
        assert len(candidate_probs(logits[row], temperature, top_k, top_p, min_p, **more)[0]) < keep  # (the check can fail)
    np.testing.assert_array_equal(got, want)


def test_drawing_without_replacement_follows_multinomial_law():
    """Each draw picks among the weights not yet drawn in proportion to them (torch.multinomial without replacement):
    first-and-second pairs at their exact probabilities, never a zero weight, never one index twice; a seed repeats."""
    weights = np.array([0.5, 0.0, 0.3, 0.2])
    rng = np.random.default_rng(0)
    pairs = np.stack([draw_without_replacement(weights, 2, rng) for _ in range(20000)])
    assert (pairs[:, 0] != pairs[:, 1]).all() and not (pairs == 1).any()
    for (first, second), want in {(0, 2): 0.5 * 0.3 / 0.5, (2, 0): 0.3 * 0.5 / 0.7, (3, 2): 0.2 * 0.3 / 0.8, (0, 3): 0.5 * 0.2 / 0.5}.items():
        assert abs(np.mean((pairs[:, 0] == first) & (pairs[:, 1] == second)) - want) < 0.01, (first, second)
    assert sorted(draw_without_replacement(weights, 3, np.random.default_rng(1)).tolist()) == [0, 2, 3]
    assert np.array_equal(draw_without_replacement(weights, 3, np.random.default_rng(5)), draw_without_replacement(weights, 3, np.random.default_rng(5)))


def test_seeded_sampler_draws_each_row_from_its_probabilities():

    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]], np.float32))
    sample = make_sampler(do_sample=True, top_k=4, seed=0)
    draws = np.stack([sample(logits) for _ in range(20000)])  # [draws, rows]
    again = make_sampler(do_sample=True, top_k=4, seed=0)
    assert np.array_equal(np.stack([again(logits) for _ in range(200)]), draws[:200])  # a seed repeats exactly
    for row in range(2):
        candidates, probs = candidate_probs(logits[row], 1.0, 4, 1.0)
        frequencies = np.bincount(draws[:, row], minlength=5) / len(draws)
        np.testing.assert_allclose(frequencies[candidates], probs, atol=0.01)
        assert frequencies[np.setdiff1d(np.arange(5), candidates)].sum() == 0  # top-k's cut token is never drawn


def test_sequence_biases_sharing_a_last_token_sum_as_transformers_sums_them():
    """Several sequences ending in token 7 (one, two and three tokens long, given out of length order) that all match:
    transformers sums their float32 biases first, grouped by prefix length, then adds the sum once; a different order
    differs in the last bit, enough to flip a near tie. Histories that end with 4, 5 so that they match."""
    rng = np.random.default_rng(5)
    for trial in range(40):
        b = rng.standard_normal(5) * 10 ** rng.uniform(-1, 2, size=5)
        bias = [[[4, 5, 7], b[0]], [[7], b[1]], [[5, 7], b[2]], [[9, 5, 7], b[3]], [[6, 7], b[4]]]
        ids = rng.integers(0, VOCAB, size=(3, PROMPT))
        ids[:2, -2:] = [4, 5]
        reference = LogitsProcessorList([SequenceBiasLogitsProcessor([[ids_, float(x)] for ids_, x in bias])])
        _same_scores_step_by_step({"sequence_bias": bias}, reference, trial, prompt_ids=ids)


def test_forced_tokens_take_all_the_mass_and_rows_with_nothing_to_draw_are_errors():
    """A token at +inf (a caller's processor forcing it; an exponential decay penalty grown past float32) takes all of
    softmax's mass, shared among such tokens, where torch's multinomial raises; beam sampling's warpers keep it. A row
    whose tokens are all forbidden, or whose scores hold NaN, is an error naming the cause."""
    logits = np.random.default_rng(3).standard_normal((2, VOCAB)).astype(np.float32)
    logits[0, 5] = logits[1, 2] = logits[1, 7] = np.inf
    for top_k in (0, 4):
        sample = make_sampler(do_sample=True, seed=0, top_k=top_k, temperature=0.7)
        draws = np.stack([sample(logits) for _ in range(200)])
        assert set(draws[:, 0].tolist()) == {5} and set(draws[:, 1].tolist()) == {2, 7}
    warped = warped_scores(logits, 1.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 1)
    assert warped[0, 5] == np.inf and np.isneginf(np.delete(warped[0], 5)).all()
    sample = make_sampler(do_sample=True, seed=0)
    with pytest.raises(ValueError, match="every token of a row is forbidden"):
        sample(np.full((1, VOCAB), -np.inf, np.float32))
    with pytest.raises(ValueError, match="NaN after the logits processors"):
        sample(np.where(np.arange(VOCAB) == 4, np.nan, 0.0).astype(np.float32)[None])


@pytest.mark.parametrize("settings", [
    {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 3},
    {"sequence_bias": [[[3, 4], 5.0], [[2, 6, 4], 4.0], [[5], -2.0]]}, {"bad_words_ids": [[1, 2], [4, 7, 2]]},
], ids=lambda settings: next(iter(settings)))
def test_reorder_gives_each_row_the_history_it_continues(settings):
    """Beam search's rows continue other rows: after `reorder(rows)` and `picked(tokens)`, each processor scores as one
    built afresh from the rows' new histories (`history[rows] ++ tokens`), step after step."""
    rng = np.random.default_rng(7)
    resolved = GenerationSettings.resolve(settings, {})
    history = rng.integers(0, VOCAB, size=(4, 12))
    processors = for_settings(resolved, history, np.ones_like(history), EOS, VOCAB)
    for _ in range(12):
        rows, tokens = rng.integers(0, 4, size=4), rng.integers(0, VOCAB, size=4)
        for process in processors:
            process.reorder(rows)
            process.picked(tokens)
        history = np.concatenate([history[rows], tokens[:, None]], axis=1)
        logits = rng.standard_normal((4, VOCAB)).astype(np.float32)
        got, want = logits.copy(), logits.copy()
        for process in processors:
            process(got)
        for process in for_settings(resolved, history, np.ones_like(history), EOS, VOCAB):
            process(want)
        np.testing.assert_array_equal(got, want)


def test_an_expired_eos_ban_leaves_the_logits_uncopied():
    """min_new_tokens' ban is over once that many tokens are out: from then on the sampler reads the decoder's
    logits as they are (no copy a step for the rest of the answer)."""
    ids = np.zeros((1, 4), np.int64)
    seen = []
    sample = with_processors(lambda scores: seen.append(scores) or scores.argmax(-1), for_settings(
        GenerationSettings.resolve({"min_new_tokens": 2}, {}), ids, np.ones_like(ids), EOS, VOCAB))
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, EOS[0]] = 1.0
    assert [int(sample(logits)[0]) for _ in range(3)] == [0, 0, EOS[0]]
    assert seen[0] is not logits and seen[1] is not logits and seen[2] is logits


def test_forced_eos_copies_the_logits_only_at_the_last_step():
    """forced_eos_token_id acts at the last new token only: the steps before it sample from the decoder's logits
    as they are, and the last one from a copy holding only the EOS id."""
    ids = np.zeros((1, 4), np.int64)
    seen = []
    sample = with_processors(lambda scores: seen.append(scores) or scores.argmax(-1), for_settings(
        GenerationSettings.resolve({"forced_eos_token_id": EOS[0], "max_new_tokens": 3}, {}), ids, np.ones_like(ids), EOS, VOCAB))
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, 5] = 1.0
    assert [int(sample(logits)[0]) for _ in range(3)] == [5, 5, EOS[0]]
    assert seen[0] is logits and seen[1] is logits and seen[2] is not logits
