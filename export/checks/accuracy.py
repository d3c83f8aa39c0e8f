"""The accuracy report of a bundle: its decoder path against the fp32 PyTorch model, teacher-forced.

For each fixed prompt (an image and a question), PyTorch greedily continues the prompt by `NEW_TOKENS`
tokens; then both models read the same tokens (teacher forcing) and we compare, at every continuation
position, the next-token logits: top-1 agreement (the share of positions where both pick the same token),
and the largest and mean absolute logit difference. Images go through each side's own vision path, so
the report covers the whole bundle: vision encoder, projector and decoder, at the bundle's precision.

PyTorch's side (`accuracy_references`) runs first and keeps only the continuations and their logits, so the
exporter can let a model it loaded go before the bundle is loaded (not both copies of the weights at once).

A checkpoint without a chat template (none of its own, and the registry's templates not installed) is asked
plain prompts instead (`<image>` and the question): the report compares the two models on the same token ids,
which it checks, so the prompt's format does not change what it measures (the manifest's `reference` says so).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnxruntime

from ortllava.generation.generate import positions_needed

from ..photos import photo

NEW_TOKENS = 24
# (width, height, seed, question): a landscape, a portrait and a square image; different tile grids.
PROMPTS = [
    (600, 400, 1, "What is shown in this image?"),
    (300, 700, 2, "Describe the picture in detail."),
    (500, 500, 3, "How many objects are there?"),
]


@dataclass
class AccuracyCase:
    question: str
    request: dict  # what both sides read: `messages=` (a chat with the image and the question) or `prompt=`, `images=`
    input_ids: np.ndarray  # [T] int64: the prompt as transformers' processor tokenised it
    continuation: np.ndarray  # [NEW_TOKENS] int64: PyTorch's greedy continuation of the prompt
    logits: np.ndarray  # [NEW_TOKENS, V] float32: PyTorch's next-token logits along it (teacher forcing)


PLAIN_REFERENCE_NOTE = " (plain prompts: the checkpoint has no chat template)"


def prompt_request(processor, image, question: str) -> dict:
    """A fixed prompt (an image and a question) as `Pipeline.prepare` takes it: chat messages, or, for a processor
    without a chat template, the plain prompt `<image>\n{question}` (transformers' processor then adds its special
    tokens, as ortllava's does)."""
    if processor.chat_template:
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]}
    return {"prompt": f"{processor.image_token}\n{question}", "images": [image]}


def torch_inputs(processor, request: dict) -> dict:
    """transformers' processor outputs (PyTorch tensors) for a `prompt_request`."""
    if "messages" in request:
        return processor.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    return processor(text=request["prompt"], images=request["images"], return_tensors="pt")


def accuracy_references(checkpoint) -> list[AccuracyCase]:
    """PyTorch's (fp32) greedy continuation of each fixed prompt, with the raw logits of each step."""
    import torch

    model, processor = checkpoint.model, checkpoint.processor
    context = model.config.text_config.max_position_embeddings
    cases, lengths = [], []
    for width, height, seed, question in PROMPTS:
        request = prompt_request(processor, photo(width, height, seed), question)
        inputs = torch_inputs(processor, request)
        lengths.append(inputs["input_ids"].shape[1])
        if positions_needed(lengths[-1], NEW_TOKENS) > context:  # a model with a short context: the prompts that fit it
            continue
        with torch.no_grad():  # the raw logits of each greedy step are the teacher-forced ones of its own continuation
            out = model.generate(
                **inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
            )
        logits = torch.cat(out.logits, dim=0).float().numpy()
        prompt_ids = inputs["input_ids"][0].numpy()
        cases.append(AccuracyCase(question, request, prompt_ids, out.sequences[0, len(prompt_ids) :].numpy(), logits))
    if not cases:
        from .validate import ExportValidationError

        raise ExportValidationError(
            f"the model's context of {context} positions holds none of the accuracy prompts ({min(lengths)} tokens with "
            f"its image and {NEW_TOKENS} to continue, at the least); export it with --no-validate"
        )
    return cases


def accuracy_report(references: list[AccuracyCase], bundle, provider: str = "cpu") -> dict:
    """The bundle, teacher-forced along each reference's continuation; returns the figures for the manifest."""
    import ortllava

    with warnings.catch_warnings():  # (an fp16 bundle is measured on the CPU on purpose: no speed warning)
        warnings.simplefilter("ignore")
        # prepack=False keeps the export's memory low (validate._session). Its kernels differ from a default
        # session's in the last bits of a logit for fp32 graphs; for fp16 ones (without graph optimizations) by
        # fp16 rounding: the tiny test model's largest logit difference is 0.021 here, 0.024 in a default session.
        # (CUDA, which fp16 bundles are for, rounds differently again.)
        pipe = ortllava.load(bundle, provider=provider, verify=False, prepack=False)
    decoder, table = pipe.sessions.decoder, pipe.embed_table
    agree, worst, total_error, count = 0, 0.0, 0.0, 0
    for case in references:
        ours_inputs, _ = pipe.prepare(**case.request)
        _check_same_tokens(case, ours_inputs["input_ids"][0])
        prompt_length = ours_inputs["input_ids"].shape[1]
        features = pipe.encode_images(ours_inputs["pixel_values"], ours_inputs["image_sizes"])
        embeds = pipe.embed(ours_inputs["input_ids"], features)
        logits, cache = decoder.start(embeds, ours_inputs["attention_mask"], positions_needed(prompt_length, NEW_TOKENS))
        ours = [logits.copy()]
        for token in case.continuation[:-1]:
            cache.step_embeds[0, 0] = table[token]
            ours.append(decoder.step(cache).copy())
        decoder.release(cache)
        ours = np.concatenate(ours, axis=0)  # [NEW_TOKENS, V]
        if not np.isfinite(ours).all():  # an fp16 overflow, or a broken quantization: no bundle rather than a wrong one
            from .validate import ExportValidationError

            raise ExportValidationError(
                f"the bundle's logits are not finite on the accuracy prompt {case.question!r} ({int((~np.isfinite(ours)).sum())} values); "
                "its graphs would give wrong answers"
            )

        reference = case.logits
        error = np.abs(ours.astype(np.float64) - reference)
        agree += int((ours.argmax(-1) == reference.argmax(-1)).sum())
        worst = max(worst, float(error.max()))
        total_error += float(error.mean()) * len(reference)
        count += len(reference)
    plain = any("messages" not in case.request for case in references)
    return {
        "reference": "PyTorch fp32, teacher-forced on its own greedy continuation" + (PLAIN_REFERENCE_NOTE if plain else ""),
        "provider": f"the {provider} execution provider, onnxruntime {onnxruntime.__version__}, prepack=False",  # (CUDA, for fp16 bundles, rounds otherwise)
        "prompts": len(references), "positions": count,
        "top1_agreement": agree / count, "max_abs_logit_diff": worst, "mean_abs_logit_diff": total_error / count,
    }


def _check_same_tokens(case: AccuracyCase, ours: np.ndarray) -> None:
    """Both sides must read the prompt as the same token ids, or the report would compare different inputs (and
    the bundle's processor would not be transformers')."""
    theirs = case.input_ids
    if len(ours) == len(theirs) and (ours == theirs).all():
        return
    from .validate import ExportValidationError

    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    raise ExportValidationError(
        f"the bundle tokenises the accuracy prompt {case.question!r} differently from transformers: {len(ours)} tokens "
        f"against {len(theirs)}, the first difference at position {first}; its processor (tokenizer, chat template or "
        "image token count) does not read prompts as transformers does"
    )
