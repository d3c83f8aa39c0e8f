"""A generation's arguments: `GenerationSettings`, named and defaulted as transformers' `generate` names them, resolved
from what the caller gives, then the bundle's generation config, then the defaults, and checked before any graph runs.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..warn import GenerationWarning, warn
from .caller_hooks import check_callables

DEFAULT_MAX_NEW_TOKENS = 256
LENGTH_ARGUMENTS = ("max_new_tokens", "max_length")  # the two ways to say how long an answer may be


class SettingError(ValueError):
    """A generation argument of the wrong type or out of its range: `name` must be `want` (`or_else`: what else a
    Python caller may pass, such as None), got `value`. The CLI says it with its flag's name."""

    def __init__(self, name: str, want: str, or_else: str, value: Any):
        super().__init__(f"{name} must be {want}{or_else}, got {value!r}")
        self.name, self.want, self.or_else, self.value = name, want, or_else, value

    def __reduce__(self):  # (pickled as it was made: a worker process's error reaches its parent)
        return type(self), (self.name, self.want, self.or_else, self.value)


@dataclass(frozen=True)
class GenerationSettings:
    """One generation's arguments, named as transformers' `generate` names them, plus `seed` and `stop`; the
    defaults are transformers' (for what neither the caller nor the bundle's generation config sets)."""

    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS  # None while max_length decides it (see for_prompt)
    # Prompt + new tokens (images included), as transformers' max_length; set only where it is in force (see resolve):
    # then max_new_tokens is max_length minus each call's prompt tokens.
    max_length: int | None = None
    min_new_tokens: int = 0  # the EOS tokens are forbidden until this many tokens are out
    # The same, counting the prompt's tokens (the padded batch's, images included); as in transformers, only where
    # min_new_tokens is not set (by the caller or the generation config).
    min_length: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0  # sampling: drop tokens less probable than min_p times the most probable one (0: off)
    typical_p: float = 1.0  # sampling: keep the tokens whose information is nearest the entropy, this much mass (1: off)
    epsilon_cutoff: float = 0.0  # sampling: drop tokens less probable than this (0: off)
    eta_cutoff: float = 0.0  # sampling: drop tokens less probable than min(eta, sqrt(eta) * e^-entropy) (0: off)
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # n > 0: no n-gram (the prompt's included) occurs twice
    # transformers' "encoder" penalties, which it applies to a decoder-only model's prompt ids: > 1 favours the prompt's
    # tokens (their logits divided by it where positive, multiplied where negative); n > 0: no n-gram of the prompt is
    # repeated in the answer (see logits_processors.PromptRepetitionPenalty, NoRepeatNGrams)
    encoder_repetition_penalty: float = 1.0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None  # token sequences never completed (the prompt counts)
    # (token ids, bias) pairs: the bias is added to a sequence's last token where the row ends with the rest of it
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] | None = None
    suppress_tokens: tuple[int, ...] | None = None  # tokens never picked
    begin_suppress_tokens: tuple[int, ...] | None = None  # tokens not picked as the first new token
    forced_eos_token_id: int | tuple[int, ...] | None = None  # the token(s) an answer that reaches max_new_tokens ends with
    # (start, factor): past `start` new tokens, the EOS logits grow by a factor a token (see logits_processors.DecayLengthPenalty)
    exponential_decay_length_penalty: tuple[int, float] | None = None
    # Classifier-free guidance (see ortllava.generation.guidance): each step's scores become g * (log p(token | prompt) -
    # u) + u, u = log p(token | the negative prompt), from a second pass of the decoder; 1: off (transformers' None).
    guidance_scale: float = 1.0
    # That pass's prompts: token ids (text only) for every prompt, or a list per prompt, of any lengths (transformers'
    # [B, T] too, with negative_prompt_attention_mask, unpadded); None: each row's last prompt token, as transformers.
    negative_prompt_ids: tuple[tuple[int, ...], ...] | None = None
    negative_prompt_attention_mask: Any = None  # (taken as transformers', and checked: negative prompts come unpadded)
    num_return_sequences: int = 1  # answers per prompt: sampled each on its own, or the best beams (at most num_beams)
    num_beams: int = 1  # > 1: beam search (beam sampling with do_sample), keeping this many running hypotheses per prompt
    length_penalty: float = 1.0  # beam search: a finished hypothesis scores its log-probability / length ** this
    early_stopping: bool | str = False  # beam search: True, False (transformers' heuristic) or "never" (see beam_search.py)
    # The processed scores log-softmaxed again, last (transformers' LogitNormalization): it changes beam search's scores
    # where processors or warpers apply, and no greedy or sampled token.
    renormalize_logits: bool = False
    output_logits: bool = False  # each result keeps the raw logits each new token was picked from
    eos_token_id: int | tuple[int, ...] | None = None  # the tokens that end an answer; None: the bundle's EOS ids
    pad_token_id: int | None = None  # fed to batch rows that have ended; None: the first EOS id (as transformers)
    seed: int | None = None  # the sampler's random seed
    stop: tuple[str, ...] = ()  # strings that end an answer where one appears (the text is cut before it)
    # transformers' stop strings: the answer ends with the token that completes one, and keeps it (with `tokenizer`,
    # which transformers needs to match them and ortllava takes and leaves: it matches the decoded text)
    stop_strings: tuple[str, ...] = ()
    # Seconds, from the end of preprocessing, after which no new token is begun (transformers' MaxTimeCriteria): the
    # answers end with the token of the step that crossed it, as at max_new_tokens (finish_reason "length").
    max_time: float | None = None
    # The caller's callables over numpy arrays, as transformers' arguments of these names (see ortllava.generation.caller_hooks):
    # processors (input_ids, scores) -> scores, after ortllava's own; criteria (input_ids, logits) -> bool or [B] bool.
    logits_processor: tuple[Callable, ...] = ()
    stopping_criteria: tuple[Callable, ...] = ()
    # Given the prompt's ids `[B, T]`, then each step's new tokens `[B]` (`put`), and told the end (`end`), as
    # transformers' streamers are (TextStreamer, TextIteratorStreamer); `generate` only (`stream()` streams itself).
    streamer: Any = None
    # (prompt index, a row's ids [T + n]) -> the token ids it may take next (transformers' prefix_allowed_tokens_fn)
    prefix_allowed_tokens_fn: Callable | None = None
    # Neither the caller nor the generation config gave a length: max_new_tokens is DEFAULT_MAX_NEW_TOKENS, held to the
    # room a prompt leaves (see for_prompt). Not an argument.
    length_is_default: bool = field(default=False, repr=False)
    # num_beams is the caller's (an argument, or the caller's generation config), not the bundle's generation config's:
    # a stream or a chat turn refuses it (`runs.one_answer`) where the bundle's gives way. Not an argument.
    beams_are_callers: bool = field(default=False, repr=False)

    @classmethod
    def resolve(cls, given: Mapping[str, Any], generation_config: Mapping[str, Any], max_positions: int | None = None) -> GenerationSettings:
        """Each argument: the caller's value (None counts as unset), else the bundle's generation config (as
        transformers reads it), else the default above. An unknown name is a TypeError naming it, as is one of
        transformers' arguments that ortllava does not implement, unless at a value where it does nothing. `max_positions`:
        the most the decoder serves, which a generation config's max_length (a model's context, say) is held to.
        A `generation_config` among `given` (transformers' GenerationConfig, or a dict) is the caller's too, under
        the other arguments (`with_callers_generation_config`)."""
        named_max_length = given.get("max_length")  # (a config's, the bundle's or the caller's, is held to the positions)
        names = set(given) - {"generation_config"}  # (a misspelt name is named even at None)
        given = with_callers_generation_config(given)
        others = sorted((names | set(given)) - set(GENERATION_ARGUMENTS))
        unimplemented = [f"{name}={_shown(given[name])}" for name in others if name in _NO_OP_VALUES and not _does_nothing(name, given.get(name))]
        unknown = [name for name in others if name not in _NO_OP_VALUES]
        if unknown or unimplemented:
            hints = "".join(f" ({name}: {_HINTS[name]})" for name in others if name in _HINTS and not _does_nothing(name, given.get(name)))
            # A misspelt name gets the nearest known ones, and the whole list where none is near.
            near = {name: difflib.get_close_matches(name, GENERATION_ARGUMENTS, n=2) for name in unknown if name not in _HINTS}
            guesses = "".join(f" ({name}: did you mean {' or '.join(matches)}?)" for name, matches in near.items() if matches)
            listed = f"; known: {', '.join(GENERATION_ARGUMENTS)}" if any(not matches for matches in near.values()) else ""
            raise TypeError(
                "; ".join(
                    ([f"unknown generation argument(s): {', '.join(unknown)}"] if unknown else [])
                    + ([f"transformers' {', '.join(unimplemented)}: not implemented by ortllava (taken only where it does nothing)"] if unimplemented else [])
                )
                + f"{guesses}{hints}{listed}"
            )
        values = {}
        for name in GENERATION_ARGUMENTS:
            value = given.get(name)
            if value is None and name not in _NOT_IN_GENERATION_CONFIG:
                value = generation_config.get(name)
            if value is not None:
                values[name] = value
        # The answer's length: the caller's max_new_tokens, else the caller's max_length, else the config's
        # max_new_tokens, else its max_length, else DEFAULT_MAX_NEW_TOKENS (transformers' default max_length of 20
        # would cut most answers; a config that sets max_length names it). Where a caller gives both, max_new_tokens
        # wins, as in transformers (and with its warning). Unlike transformers, a caller's max_length also wins over
        # a config's max_new_tokens: the caller's choice of length is the one that applies.
        source = given if any(given.get(name) is not None for name in LENGTH_ARGUMENTS) else generation_config
        if source.get("max_new_tokens") is not None:
            if source is given and given.get("max_length") is not None:
                warn(
                    f"Both `max_new_tokens` (={given['max_new_tokens']}) and `max_length` (={given['max_length']}) seem to have been "
                    "set. `max_new_tokens` will take precedence.",
                    GenerationWarning,
                )
            values.pop("max_length", None)
        elif source.get("max_length") is not None:
            values["max_new_tokens"] = None
            if named_max_length is None and max_positions is not None and isinstance(values["max_length"], int):
                values["max_length"] = min(values["max_length"], max_positions + 1)  # (the last new token takes no position)
        else:
            values["length_is_default"] = True
        if "min_new_tokens" in values and "min_length" in values:  # (transformers: min_new_tokens, once set, replaces min_length)
            if values["min_length"] != 0:  # (and warns, as here, wherever each came from)
                warn(
                    f"Both `min_new_tokens` (={values['min_new_tokens']}) and `min_length` (={values['min_length']}) seem to have been "
                    "set. `min_new_tokens` will take precedence.",
                    GenerationWarning,
                )
            values.pop("min_length")
        for name in ("eos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "exponential_decay_length_penalty"):
            if isinstance(values.get(name), Iterable) and not isinstance(values[name], (str, bytes, Mapping)):
                values[name] = tuple(values[name])
        if values.get("bad_words_ids") is not None:
            values["bad_words_ids"] = _token_sequences("bad_words_ids", values["bad_words_ids"])
        if values.get("sequence_bias") is not None:
            values["sequence_bias"] = _sequence_biases(values["sequence_bias"])
        if values.get("negative_prompt_ids") is not None or values.get("negative_prompt_attention_mask") is not None:
            values["negative_prompt_ids"] = _negative_prompts(values.get("negative_prompt_ids"), values.pop("negative_prompt_attention_mask", None))
        for name in ("suppress_tokens", "begin_suppress_tokens"):  # (an empty list suppresses nothing)
            if values.get(name) == ():
                values[name] = None
        for name in ("logits_processor", "stopping_criteria"):
            values[name] = check_callables(name, values.get(name))
        if values.get("prefix_allowed_tokens_fn") is not None and not callable(values["prefix_allowed_tokens_fn"]):
            raise TypeError(f"prefix_allowed_tokens_fn must be a callable (prompt index, ids) -> allowed token ids, got {type(values['prefix_allowed_tokens_fn']).__name__}")
        streamer = values.get("streamer")
        if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise TypeError(f"streamer must have put(token_ids) and end() methods, as transformers' TextStreamer has; got {type(streamer).__name__}")
        for name in ("stop", "stop_strings"):  # one string, or several
            if name in values:
                stop = values[name]
                values[name] = (stop,) if isinstance(stop, str) or not isinstance(stop, Iterable) else tuple(stop)
        values["beams_are_callers"] = given.get("num_beams") not in (None, 1)  # (1: no beams, whoever said so)
        settings = replace(cls(), **values)
        settings._check()
        defaults = cls()
        idle = [f"{name}={given[name]!r}" for name in SAMPLING_ARGUMENTS if given.get(name) is not None and given[name] != getattr(defaults, name)]
        if settings.negative_prompt_ids is not None and settings.guidance_scale == 1:
            warn("negative_prompt_ids does nothing without guidance_scale (1: no guidance): pass guidance_scale > 1 to guide away from it", GenerationWarning)
        if idle and not settings.do_sample:  # (as transformers warns of the caller's, not of a generation config's)
            warn(
                f"do_sample is not True, so {', '.join(idle)} {'do' if len(idle) > 1 else 'does'} nothing (sampling only): pass do_sample=True to sample",
                GenerationWarning,
            )
        # Plain Python values where numpy ones would behave otherwise (`np.True_ is True` is False; an integer's
        # negative power is an error).
        early_stopping = settings.early_stopping if settings.early_stopping == "never" else bool(settings.early_stopping)
        return replace(settings, length_penalty=float(settings.length_penalty), early_stopping=early_stopping)

    def _check(self) -> None:
        """Each argument's type and range, so a bad one is an error naming it rather than a traceback (or a
        silently different setting) later. Beam search with stop strings or output_logits is refused where num_beams
        is the caller's (the bundle's gives way in a stream or a chat, `runs.one_answer`, and is refused by `generate`)."""

        def fail(name: str, want: str, or_else: str = "") -> None:
            raise SettingError(name, want, or_else, getattr(self, name))

        def integer(value: Any) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def number(value: Any) -> bool:  # a finite one (a NaN passes no comparison, so no range check)
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("do_sample", "output_logits", "renormalize_logits"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                fail(name, "True or False")
        least_values = (
            ("max_new_tokens", 1), ("min_new_tokens", 0), ("min_length", 0), ("num_return_sequences", 1), ("no_repeat_ngram_size", 0),
            ("encoder_no_repeat_ngram_size", 0), ("num_beams", 1),
        )
        for name, least in least_values:
            if name == "max_new_tokens" and self.max_length is not None:
                continue  # (None: max_length decides it)
            if not integer(getattr(self, name)) or getattr(self, name) < least:
                fail(name, f"an integer >= {least}")
        if self.max_length is not None and (not integer(self.max_length) or self.max_length < 2):
            fail("max_length", "an integer >= 2 (the prompt's tokens and the new ones), or None")
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            if not number(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "a number > 0")
        if not number(self.guidance_scale):
            fail("guidance_scale", "a number (1: no guidance)")
        if self.do_sample:  # the warpers' settings count only when sampling (transformers ignores them otherwise)
            if not integer(self.top_k) or self.top_k < 0:
                fail("top_k", "an integer >= 0 (0: off)")
            if not number(self.temperature) or self.temperature <= 0:
                fail("temperature", "a number > 0")
            if not number(self.top_p) or not 0 < self.top_p <= 1:
                fail("top_p", "a number in (0, 1]")
            if not number(self.min_p) or not 0 <= self.min_p <= 1:
                fail("min_p", "a number in [0, 1] (0: off)")
            if not number(self.typical_p) or not 0 < self.typical_p <= 1:
                fail("typical_p", "a number in (0, 1] (1: off)")
            for name in ("epsilon_cutoff", "eta_cutoff"):
                if not number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                    fail(name, "a number in [0, 1) (0: off)")
        if not number(self.length_penalty):
            fail("length_penalty", "a number")
        if not (isinstance(self.early_stopping, (bool, np.bool_)) or self.early_stopping == "never"):
            fail("early_stopping", 'True, False or "never"')
        if self.not_for_beams and self.beams_are_callers:
            raise ValueError(f"{self.not_for_beams}: not implemented for beam search (num_beams={self.num_beams})")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:  # (transformers' words)
            raise ValueError(
                f"`num_return_sequences` ({self.num_return_sequences}) has to be smaller or equal to `num_beams` ({self.num_beams})."
            )
        if self.num_return_sequences > 1 and not self.do_sample and self.num_beams == 1:  # (transformers' words)
            raise ValueError(
                "Greedy methods (do_sample != True) without beam search do not support `num_return_sequences` different "
                f"than 1 (got {self.num_return_sequences}): its answers would all be the same; pass do_sample=True or num_beams > 1"
            )
        if self.seed is not None and not (integer(self.seed) and self.seed >= 0):
            fail("seed", "an integer >= 0", ", or None (a fresh random seed)")
        for name in ("eos_token_id", "forced_eos_token_id"):
            ids = getattr(self, name)
            if ids is not None and not (integer(ids) and ids >= 0 or isinstance(ids, tuple) and all(integer(i) and i >= 0 for i in ids)):
                fail(name, "a token id or a list of them")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            ids = getattr(self, name)
            if ids is not None and not (isinstance(ids, tuple) and all(integer(i) and i >= 0 for i in ids)):
                fail(name, "a list of token ids")
        if self.pad_token_id is not None and not (integer(self.pad_token_id) and self.pad_token_id >= 0):
            fail("pad_token_id", "a token id or None")
        for name in ("stop", "stop_strings"):
            if not all(isinstance(text, str) and text for text in getattr(self, name)):
                fail(name, "a non-empty string", " or a list of them")
        decay = self.exponential_decay_length_penalty
        if decay is not None and not (isinstance(decay, tuple) and len(decay) == 2 and integer(decay[0]) and decay[0] >= 0 and number(decay[1])):
            fail("exponential_decay_length_penalty", "a pair (start: an integer >= 0, factor: a number)", ", or None")
        if self.max_time is not None and not (number(self.max_time) and self.max_time > 0):
            fail("max_time", "a number of seconds > 0", ", or None (no limit)")


    @property
    def rows_per_prompt(self) -> int:
        """The cache's rows for each prompt: its beams (beam search), else its answers (num_return_sequences), all
        from one prefill; rows 0..n-1 answer prompt 0, as transformers orders them."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    @property
    def not_for_beams(self) -> str | None:
        """What these settings ask for that beam search does not give ("stop strings", "output_logits", "streamer"), or None."""
        if self.num_beams > 1:
            asked = [("stop strings", self.stop or self.stop_strings), ("output_logits", self.output_logits), ("streamer", self.streamer is not None)]
            return next((name for name, given in asked if given), None)
        return None

    def for_prompt(self, prompt_tokens: int, positions: int | None = None) -> GenerationSettings:
        """These settings for a prompt of `prompt_tokens` (the padded batch's length, images included): where
        `max_length` is in force, `max_new_tokens` becomes `max_length - prompt_tokens`, as transformers counts it
        (a ValueError, in its words, where the prompt leaves no room). Where the length is the default, it is held to
        the room the prompt leaves in the decoder's `positions` (an answer may end at the last one), so a long prompt
        gets a shorter answer rather than an error it did not ask for."""
        if self.length_is_default and positions is not None:
            room = positions - prompt_tokens + 1  # (the last new token takes no position)
            return replace(self, max_new_tokens=max(1, room)) if room < self.max_new_tokens else self  # (< 1: refused by the caller)
        if self.max_length is None:
            return self
        if prompt_tokens >= self.max_length:
            raise ValueError(
                f"Input length of input_ids is {prompt_tokens} (images included), but `max_length` is set to {self.max_length}: "
                "no room for a new token. Increase `max_length` or, better yet, set `max_new_tokens`."
            )
        return replace(self, max_new_tokens=self.max_length - prompt_tokens, max_length=None)


SAMPLING_ARGUMENTS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")  # (what they shape)
GENERATION_ARGUMENTS = tuple(f.name for f in fields(GenerationSettings) if f.name not in ("length_is_default", "beams_are_callers"))
_HINTS = {  # transformers' names that ortllava takes otherwise, or not at all
    "num_beam_groups": "diverse beam search is not implemented",
    "output_scores": "output_logits=True gives each result the raw logits of each new token",
    "return_dict_in_generate": "results are objects already; output_logits=True adds the logits",
    # (Pipeline.generate's inputs under other names)
    "image": "images=... takes the image(s)", "text": "a prompt string goes in prompt=... (a chat in messages=...)",
    "position_ids": "the model inputs taken are input_ids, attention_mask, pixel_values, image_sizes and mm_token_type_ids",
    "inputs_embeds": "the model inputs taken are input_ids, attention_mask, pixel_values, image_sizes and mm_token_type_ids",
}
# Arguments not read from a generation config: ortllava's own (a generation_config.json has no such keys), and
# those that change what generate returns: num_return_sequences (a list per prompt, which a chat or a stream cannot
# give; a config that sets it is warned of at load, see below) and output_logits (transformers returns its logits
# only with return_dict_in_generate), so only a caller asks for them; and the caller's callables.
_NOT_IN_GENERATION_CONFIG = {
    "seed", "stop", "num_return_sequences", "output_logits", "logits_processor", "stopping_criteria", "streamer", "prefix_allowed_tokens_fn",
    "negative_prompt_ids", "negative_prompt_attention_mask",
}

# generation_config.json keys with which transformers' `generate` gives other tokens or outputs, and which ortllava
# does not apply: each with the values at which it does nothing.
UNSUPPORTED_GENERATION_KEYS: dict[str, tuple[Any, ...]] = {
    "num_beam_groups": (1,), "num_return_sequences": (1,), "penalty_alpha": (0,), "dola_layers": (),
    "force_words_ids": ([],), "constraints": ([],), "forced_bos_token_id": (),
    "top_h": (),
    "watermarking_config": (), "token_healing": (False,),
}


# transformers' generate arguments that do nothing here at these values (their defaults, or beam search off), so
# code written for transformers may pass them: each with the values taken (and ignored); None counts as unset, as for
# every argument here.
ANY_VALUE = object()  # (in a no-op values tuple: every value does nothing)
_CALL_ONLY_NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "use_cache": (True,), "output_scores": (False,), "output_attentions": (False,), "output_hidden_states": (False,),
    "return_dict_in_generate": (False,),
    "remove_invalid_values": (False,),
    "assistant_model": (), "diversity_penalty": (0,),
    "tokenizer": (ANY_VALUE,),  # (transformers matches stop_strings with it; ortllava has the bundle's)
    # (transformers reads these only to start a prompt where none is given; ortllava is always given one)
    "bos_token_id": (ANY_VALUE,), "decoder_start_token_id": (ANY_VALUE,),
    # GenerationConfig fields that choose how transformers runs, not what it answers (its cache, compilation,
    # batching), or tune an assistant model, which is refused above: whatever a config sets them to.
    **dict.fromkeys(
        ("cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile", "continuous_batching_config",
         "prefill_chunk_size", "low_memory", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
         "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "max_matching_ngram_size"),
        (ANY_VALUE,),
    ),
    # Speculative decoding without an assistant model: not implemented (only unset).
    "prompt_lookup_num_tokens": (), "assistant_early_exit": (), "use_mtp": (False,), "speculation_type": (),
}
_NO_OP_VALUES = {**UNSUPPORTED_GENERATION_KEYS, **_CALL_ONLY_NO_OP_VALUES}


def _does_nothing(name: str, value: Any) -> bool:
    """Whether `name`, one of transformers' generate arguments that ortllava does not implement, is given at a value
    where it does nothing (a name transformers does not have is never: it is a typo to name)."""
    if name not in _NO_OP_VALUES:
        return False
    if value is None or _NO_OP_VALUES[name] == (ANY_VALUE,):
        return True
    if not isinstance(value, (bool, int, float, list, dict)):  # (an array, a model, a config: never a no-op value here)
        return False
    # (True is no 1 here: num_beam_groups=True is a mistake to name, not diverse beam search off)
    return any(value == no_op and isinstance(value, bool) == isinstance(no_op, bool) for no_op in _NO_OP_VALUES[name])


def with_callers_generation_config(given: Mapping[str, Any]) -> dict[str, Any]:
    """`given` with its `generation_config` (transformers' `GenerationConfig`, or a dict of its fields) spread into
    arguments, each under the one `given` names itself: transformers 5 reads a caller's config so (its unset fields
    from the model's config, the generate arguments over it). A config's unset (None) fields, its
    `transformers_version` and private fields are not arguments; the rest are checked as arguments are."""
    config = given.get("generation_config")
    named = {k: v for k, v in given.items() if k != "generation_config" and v is not None}  # (None: unset, as everywhere here)
    if config is None:
        return named
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"generation_config must be a transformers GenerationConfig or a dict of its fields, got {_shown(config)}")
    spread = {k: v for k, v in config.items() if v is not None and k != "transformers_version" and not str(k).startswith("_")}
    return {**spread, **named}


def _shown(value: Any, most: int = 40) -> str:
    """`value` as an error message names it: its repr, or its type where that is long (a model, a config)."""
    text = repr(value)
    return text if len(text) <= most else f"<{type(value).__name__}>"


def unsupported_generation_settings(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a generation config that would change transformers' answers and that ortllava ignores."""
    return {
        key: value for key, value in generation_config.items()
        if key in UNSUPPORTED_GENERATION_KEYS and value is not None and value not in UNSUPPORTED_GENERATION_KEYS[key]
    }


def shown_settings(ignored: Mapping[str, Any]) -> str:
    """`unsupported_generation_settings`' result as a warning names it: `a=1, b=[2]`."""
    return ", ".join(f"{k}={v!r}" for k, v in ignored.items())


def _token_sequences(name: str, value: Any) -> tuple[tuple[int, ...], ...] | None:
    """A list of token-id lists (transformers' `bad_words_ids`) as tuples (None for an empty one: nothing to ban); a
    ValueError naming `name` where it is not such a list."""
    try:
        sequences = tuple(tuple(ids) for ids in value)
    except TypeError:
        sequences = None
    if sequences == ():
        return None
    if sequences is None or not all(ids and all(_token_id(t) for t in ids) for ids in sequences):
        raise ValueError(f"{name} must be a non-empty list of non-empty lists of token ids, got {_shown(value)}")
    return tuple(tuple(int(t) for t in ids) for ids in sequences)


def _sequence_biases(value: Any) -> tuple[tuple[tuple[int, ...], float], ...] | None:
    """transformers' `sequence_bias`, given as `[[token ids, bias], ...]` (a generation config's form) or
    `{(token ids): bias}`, as (token ids, bias) pairs (None for an empty one); a ValueError where it is neither."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        pairs = [(tuple(ids), bias) for ids, bias in pairs]
    except (TypeError, ValueError):
        pairs = None
    if pairs == []:
        return None
    if pairs is None or not all(
        ids and all(_token_id(t) for t in ids) and isinstance(bias, (int, float, np.integer, np.floating)) and not isinstance(bias, bool)
        and not math.isnan(bias) and bias != math.inf for ids, bias in pairs
    ):
        raise ValueError(
            f"sequence_bias must be a non-empty list of [token ids, bias] pairs (or a dict of them), each bias a number "
            f"(or -inf: never), got {_shown(value)}"
        )
    return tuple((tuple(int(t) for t in ids), float(bias)) for ids, bias in pairs)


def _negative_prompts(ids: Any, mask: Any) -> tuple[tuple[int, ...], ...]:
    """`negative_prompt_ids` (a list of ids, a list of such lists, or an array or tensor `[T]` or `[B, T]`) as one tuple
    of ids per negative prompt. `mask` (transformers' `negative_prompt_attention_mask`, of the ids' shape) must hold only
    ones: a ValueError says why where it pads, and names what else is wrong."""
    if ids is None:
        raise ValueError("negative_prompt_attention_mask was given without negative_prompt_ids")
    rows = _id_rows(ids)
    if rows is None or not all(rows):
        raise ValueError(
            f"negative_prompt_ids must be token ids, a list of them for each prompt (each non-empty), or an array [B, T] of them; got {_shown(ids)}"
        )
    if mask is not None:
        mask_rows = _id_rows(mask, _mask_value)
        if mask_rows is None or [len(row) for row in mask_rows] != [len(row) for row in rows]:
            raise ValueError(f"negative_prompt_attention_mask must have negative_prompt_ids' shape, got {_shown(mask)}")
        if any(value != 1 for row in mask_rows for value in row):
            raise ValueError(
                "negative_prompt_attention_mask pads a negative prompt: transformers' guidance pass gives its tokens other positions "
                "than the same prompt's alone (it passes no position ids), so ortllava takes negative prompts unpadded: give "
                "negative_prompt_ids as a list of id lists, one per prompt, of any lengths"
            )
    return rows


def _id_rows(value: Any, valid: Callable[[Any], bool] | None = None) -> tuple[tuple[int, ...], ...] | None:
    """Token ids `[T]` or rows of them `[B, T]` (lists, arrays, tensors, numpy integers; rows may differ in length) as
    rows of ints, or None where `value` is no such thing (`valid`: what each value must be; token ids by default)."""
    valid = valid or _token_id

    def is_array(item: Any) -> bool:  # (numpy arrays and torch tensors of one dimension or more, not numpy scalars)
        return hasattr(item, "tolist") and getattr(item, "ndim", 0) >= 1

    if is_array(value):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        return None
    rows = value if all(isinstance(row, (list, tuple)) or is_array(row) for row in value) else [value]
    rows = [row.tolist() if is_array(row) else row for row in rows]
    if not all(isinstance(row, (list, tuple)) and all(valid(t) for t in row) for row in rows):
        return None
    return tuple(tuple(int(t) for t in row) for row in rows)


def _mask_value(value: Any) -> bool:
    """An attention mask's entry: 0 or 1, as an integer, a bool or a float."""
    return isinstance(value, (int, float, bool, np.integer, np.floating, np.bool_)) and value in (0, 1)


def _token_id(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0
