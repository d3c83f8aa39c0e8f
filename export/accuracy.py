"""The accuracy report of a bundle: its decoder path against the fp32 PyTorch model, teacher-forced.

For each fixed prompt (an image and a question), PyTorch greedily continues the prompt by `NEW_TOKENS`
tokens; then both models read the same tokens (teacher forcing) and we compare, at every continuation
position, the next-token logits: top-1 agreement (the share of positions where both pick the same token),
and the largest and mean absolute logit difference. Images go through each side's own vision path, so
the report covers the whole bundle: vision encoder, projector and decoder, at the bundle's precision.
"""

from __future__ import annotations

import warnings

import numpy as np

from .photos import photo

NEW_TOKENS = 24
# (width, height, seed, question): a landscape, a portrait and a square image; different tile grids.
PROMPTS = [
    (600, 400, 1, "What is shown in this image?"),
    (300, 700, 2, "Describe the picture in detail."),
    (500, 500, 3, "How many objects are there?"),
]


def accuracy_report(checkpoint, bundle, provider: str = "cpu") -> dict:
    """Runs the fixed prompts through PyTorch (fp32) and the bundle; returns the figures for the manifest."""
    import torch

    import ortllava

    model, processor = checkpoint.model, checkpoint.processor
    with warnings.catch_warnings():  # (an fp16 bundle is measured on the CPU on purpose: no speed warning)
        warnings.simplefilter("ignore")
        pipe = ortllava.load(bundle, provider=provider, verify=False)
    decoder, table = pipe.sessions.decoder, pipe.embed_table
    agree, worst, total_error, count = 0, 0.0, 0.0, 0
    for width, height, seed, question in PROMPTS:
        messages = [{"role": "user", "content": [{"type": "image", "image": photo(width, height, seed)}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
        prompt_length = inputs["input_ids"].shape[1]
        with torch.no_grad():  # the raw logits of each greedy step are the teacher-forced ones of its own continuation
            out = model.generate(
                **inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
            )
        reference = torch.cat(out.logits, dim=0).float().numpy()  # [NEW_TOKENS, V]
        continuation = out.sequences[0, prompt_length:].numpy()

        ours_inputs, _ = pipe.prepare(messages=messages)
        features = pipe.encode_images(ours_inputs["pixel_values"], ours_inputs["image_sizes"])
        embeds = pipe.embed(ours_inputs["input_ids"], features)
        logits, cache = decoder.start(embeds, ours_inputs["attention_mask"], prompt_length + NEW_TOKENS)
        ours = [logits.copy()]
        for token in continuation[:-1]:
            cache.step_embeds[0, 0] = table[token]
            ours.append(decoder.step(cache).copy())
        decoder.release(cache)
        ours = np.concatenate(ours, axis=0)  # [NEW_TOKENS, V]
        if not np.isfinite(ours).all():  # an fp16 overflow, or a broken quantization: no bundle rather than a wrong one
            from .validate import ExportValidationError

            raise ExportValidationError(
                f"the bundle's logits are not finite on the accuracy prompt {question!r} ({int((~np.isfinite(ours)).sum())} values); "
                "its graphs would give wrong answers"
            )

        error = np.abs(ours.astype(np.float64) - reference)
        agree += int((ours.argmax(-1) == reference.argmax(-1)).sum())
        worst = max(worst, float(error.max()))
        total_error += float(error.mean()) * len(reference)
        count += len(reference)
    return {
        "reference": "PyTorch fp32, teacher-forced on its own greedy continuation",
        "prompts": len(PROMPTS), "positions": count,
        "top1_agreement": agree / count, "max_abs_logit_diff": worst, "mean_abs_logit_diff": total_error / count,
    }
