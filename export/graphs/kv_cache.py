"""Static scales for an int8 key/value cache (`--kv-cache int8`, "gqa" decoders).

GroupQueryAttention stores each new key/value as `round(x / scale)` clipped to int8, and reads the cache
back as `q * scale`, with one scale per key/value head and channel (`PER_CHANNEL`, `[n_kv, 1, head_dim]`).
The scales are static, so they are calibrated here: the PyTorch model prefills a few prompts with images
(not the accuracy report's), and each channel's scale is the largest |value| its cache held, with headroom,
over 127. Keys are cached after the rotary embedding, which is what transformers' cache holds too.

Why int8: at image-sized contexts a decode step reads the whole cache; with int4 weights on the CPU the
fp32 cache is most of the bytes a step reads (docs/measurements.md), and int8 reads a quarter of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..photos import photo

KV_CACHE_TYPES = ("auto", "float", "int8")
# Values up to this factor beyond the largest calibrated one still fit; the rounding step grows by as much.
HEADROOM = 1.25
# (width, height, seed, question): other images and questions than the accuracy report's.
CALIBRATION_PROMPTS = [
    (640, 480, 21, "Describe this image."),
    (360, 800, 22, "What colours do you see, and where?"),
    (512, 512, 23, "Write a short story about this picture."),
]


def resolve_kv_cache(kv_cache: str, precision: str, decoder: str, half: bool) -> str:
    """"auto" -> "int8" for int4 weights with fp32 activations on the gqa decoder (the CPU int4 bundle: there
    the float cache is most of what a step reads), "float" everywhere else (fp32 keeps transformers' exact
    tokens; fp16 and CUDA bundles have no verified int8 cache). "float" and "int8" are kept as given."""
    if kv_cache != "auto":
        return kv_cache
    return "int8" if precision == "int4" and decoder == "gqa" and not half else "float"


@dataclass
class KVScales:
    """Per layer: key and value scales `[n_kv, 1, head_dim]` float32."""

    keys: list[np.ndarray]
    values: list[np.ndarray]


def calibrate_kv_scales(checkpoint) -> KVScales:
    """Runs the calibration prompts through the PyTorch model and returns the int8 scales of every layer."""
    import torch

    from ..checks.accuracy import prompt_request, torch_inputs
    from .wrappers import output_cache

    model, processor = checkpoint.model, checkpoint.processor
    keys: list[np.ndarray] | None = None
    values: list[np.ndarray] | None = None
    dtype = next(model.parameters()).dtype
    for width, height, seed, question in CALIBRATION_PROMPTS:
        # (a plain prompt where the checkpoint has no chat template: the scales are the keys'/values' ranges over
        # image prompts, which the template's few tokens hardly change)
        inputs = torch_inputs(processor, prompt_request(processor, photo(width, height, seed), question))
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        with torch.no_grad():
            # Only the cache is wanted: one position's logits, not every position's (2k x vocab floats).
            cache = output_cache(model(**inputs, use_cache=True, logits_to_keep=1))
        # [1, n_kv, T, head_dim] per layer -> largest |x| per head and channel: [n_kv, 1, head_dim]
        layer_keys = [layer.keys.abs().amax(dim=(0, 2))[:, None, :].float().numpy() for layer in cache.layers]
        layer_values = [layer.values.abs().amax(dim=(0, 2))[:, None, :].float().numpy() for layer in cache.layers]
        keys = layer_keys if keys is None else [np.maximum(a, b) for a, b in zip(keys, layer_keys)]
        values = layer_values if values is None else [np.maximum(a, b) for a, b in zip(values, layer_values)]

    def scale(largest: np.ndarray) -> np.ndarray:
        return (np.maximum(largest, 1e-6) * HEADROOM / 127).astype(np.float32)  # an all-zero channel still gets a step

    return KVScales([scale(k) for k in keys], [scale(v) for v in values])
