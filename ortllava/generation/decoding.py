"""What picks a generation's tokens: the sampler behind the logits processors (ortllava's, then the caller's hooks),
built over the rows the cache will have. Built as a request is checked (`Pipeline._check_request`), so that a mistake
in its arguments (a banned token past the vocabulary, ...) is raised by the call itself, before any cache is taken."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .caller_hooks import CallerHooks, PrefixConstrained
from .guidance import ClassifierFreeGuidance, GuidanceModel, negative_rows
from .logits_processors import LogitsProcessor, for_settings, with_processors
from .sampling import Sampler, make_sampler
from .settings import GenerationSettings


@dataclass
class Decoding:
    """The sampler behind the processors, those processors, the caller's hooks (None: none given), and the rows'
    prompt ids and attention mask `[rows, T]`, each prompt's row repeated `settings.rows_per_prompt` times."""

    sample: Sampler
    processors: list[LogitsProcessor]
    hooks: CallerHooks | None
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray


def decoding_for(
    settings: GenerationSettings, input_ids: np.ndarray, attention_mask: np.ndarray, eos: list[int], vocab_size: int,
    guidance_model: GuidanceModel | None = None,
) -> Decoding:
    """The decoding `settings` ask for, over the prompts `input_ids`, `attention_mask` `[B, T]`. `guidance_model`: what
    classifier-free guidance runs, where `settings.guidance_scale` turns it on (a ValueError where it is not given)."""
    copies = settings.rows_per_prompt
    if copies > 1:
        input_ids, attention_mask = np.repeat(input_ids, copies, axis=0), np.repeat(attention_mask, copies, axis=0)
    sampler = make_sampler(
        settings.do_sample, settings.temperature, settings.top_k, settings.top_p, settings.seed, settings.min_p, settings.typical_p,
        settings.epsilon_cutoff, settings.eta_cutoff,
    )
    hooks = constraint = None
    if settings.logits_processor or settings.stopping_criteria or settings.prefix_allowed_tokens_fn:
        hooks = CallerHooks(input_ids, settings.max_new_tokens, settings.logits_processor, settings.stopping_criteria)
    if settings.prefix_allowed_tokens_fn is not None:
        constraint = PrefixConstrained(hooks, settings.prefix_allowed_tokens_fn, copies)
    guidance = None
    if settings.guidance_scale != 1:
        if guidance_model is None:
            raise ValueError("guidance_scale needs the decoder for its unconditional pass: not available here")
        rows = negative_rows(settings.negative_prompt_ids, input_ids, copies, vocab_size)
        guidance = ClassifierFreeGuidance(settings.guidance_scale, guidance_model, rows, settings.max_new_tokens)
        guidance.check()
    processors = for_settings(settings, input_ids, attention_mask, eos, vocab_size, constraint, guidance)
    if hooks is not None:  # (the caller's processors: after ortllava's, as transformers merges them)
        processors.append(hooks)
    return Decoding(with_processors(sampler, processors), processors, hooks, input_ids, attention_mask)
