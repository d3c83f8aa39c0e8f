"""Each exported graph against PyTorch, on input shapes not used for tracing.

Tolerance (fp32): |onnx - torch| <= ATOL * max(1, max|torch|) + RTOL * |torch| elementwise. Both run the
same fp32 math in a different order. On small models the differences are ~1e-6 relative, but they grow with
depth, width and context: on a 10-layer, 1536-wide random model at 1100 tokens PyTorch's own fp32 logits differ
from fp64 by 4e-3 (the graph by 7e-3, every argmax the same). 1e-3 of the largest value, + 1e-3 relative, stays
clear of that and still catches any real mismatch (a wrong mask, position or layer shows up as O(1) differences).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ortllava import manifest as names

from .convert import decoder_example, decoder_io_names
from .wrappers import Decoder, Projector, VisionEncoder, cache_argument, text_geometry

ATOL, RTOL = 1e-3, 1e-3
# fp16 graphs are held to their own bound against the fp32 model: half precision keeps ~3 significant
# digits, and errors grow through the layers; a wrong mask, position or weight still shows as O(1).
FP16_ATOL, FP16_RTOL = 5e-2, 5e-2

# (batch, new tokens, past length, left padding of row 0): none of them the traced (2, 5, 3).
DECODER_CASES = [(1, 7, 0, 0), (3, 1, 9, 2), (2, 4, 6, 3)]
VISION_TILES = [1, 3]


class ExportValidationError(RuntimeError):
    pass


def _compare(name: str, got: np.ndarray, want: np.ndarray, where: np.ndarray | None = None, tolerance: tuple[float, float] = (ATOL, RTOL)) -> float:
    if got.shape != want.shape:
        raise ExportValidationError(f"{name}: ONNX shape {got.shape} != PyTorch shape {want.shape}")
    atol, rtol = tolerance
    want = want.astype(np.float64)
    error = np.abs(got.astype(np.float64) - want)
    # Summation-order error scales with the magnitudes summed, not with each result: a logit near 0 is a
    # sum of large terms. So the absolute part grows with the tensor's largest value.
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    bound = atol * scale + rtol * np.abs(want)
    if where is not None:
        error, bound = error[where], bound[where]
    worst = float(error.max()) if error.size else 0.0
    if not np.isfinite(got).all() or (error > bound).any():
        raise ExportValidationError(f"{name}: ONNX differs from PyTorch by up to {worst:.3g} (tolerance {atol} + {rtol} x |value|)")
    return worst


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16 graphs on the CPU warn about casts they insert
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def validate_vision(model, encoder_path: Path, projector_path: Path, dtype=np.float32) -> dict[str, float]:
    """Both graphs on 1 and 3 tiles; fp16 graphs get fp16 inputs and the fp16 bound."""
    encoder, projector = _session(encoder_path), _session(projector_path)
    tolerance = (ATOL, RTOL) if dtype == np.float32 else (FP16_ATOL, FP16_RTOL)
    torch_encoder, torch_projector = VisionEncoder(model).eval(), Projector(model).eval()
    size = model.config.vision_config.image_size
    worst = {"vision_encoder": 0.0, "projector": 0.0}
    generator = torch.Generator().manual_seed(1)
    for tiles in VISION_TILES:
        pixels = torch.randn(tiles, 3, size, size, generator=generator)
        want = torch_encoder(pixels)
        (got,) = encoder.run(None, {names.PIXEL_VALUES: pixels.numpy().astype(dtype)})
        worst["vision_encoder"] = max(worst["vision_encoder"], _compare(f"vision_encoder ({tiles} tiles)", got, want.numpy(), tolerance=tolerance))
        (got_proj,) = projector.run(None, {names.IMAGE_FEATURES: want.numpy().astype(dtype)})
        want_proj = torch_projector(want).numpy()
        worst["projector"] = max(worst["projector"], _compare(f"projector ({tiles} tiles)", got_proj, want_proj, tolerance=tolerance))
    return worst


@torch.no_grad()
def validate_decoder(model, decoder_path: Path) -> dict[str, float]:
    session = _session(decoder_path)
    module = Decoder(model).eval()
    input_names, _ = decoder_io_names(text_geometry(model.config)[0])
    worst_logits = worst_cache = 0.0
    generator = torch.Generator().manual_seed(2)
    for batch, seq, past, padding in DECODER_CASES:
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        mask[0, :padding] = 0
        embeds, mask, positions, cache = decoder_example(model, batch, seq, past, mask, generator)
        want = module(embeds, mask, positions, cache)
        feed = dict(zip(input_names, [embeds.numpy(), mask.numpy(), positions.numpy(), *[c.numpy() for c in cache]]))
        got = session.run(None, feed)
        case = f"decoder (batch {batch}, {seq} new, {past} past, {padding} padded)"
        worst_logits = max(worst_logits, _compare(f"{case} logits", got[0], want[0].numpy()))
        # Padded positions attend to nothing; their keys/values are never read, and frameworks fill them differently.
        real = mask.numpy().astype(bool)[:, None, :, None]
        for index, (g, w) in enumerate(zip(got[1:], want[1:])):
            where = np.broadcast_to(real, g.shape)
            worst_cache = max(worst_cache, _compare(f"{case} present {index}", g, w.numpy(), where))
    return {"decoder_logits": worst_logits, "decoder_present": worst_cache}


# Fused ("gqa") decoder cases. Prompts: right-padded rows of these lengths, one beyond a 1024-token sliding
# window; then DECODE_STEPS single-token steps with the mask at the buffer's full width (as the runtime
# runs them); then, for one row, a 4-token continuation (a chat's next turn). With fp32 activations the two
# attention forms are both checked (export/attention.py): the short rows' steps run GroupQueryAttention (their
# buffer is mostly free), the 1100-token row's run the standard-op form (its buffer is mostly filled).
FUSED_PROMPTS = [[9, 5, 1], [1100]]
DECODE_STEPS = 3
FUSED_CAPACITY = 1200


@torch.no_grad()
def validate_fused_decoder(model, decoder_path: Path, dtype=np.float32) -> dict[str, float]:
    """Runs the fused graph the way the runtime does (shared buffers, IO binding) against transformers."""
    session = _session(decoder_path)
    text = model.config.text_config
    _, kv_heads, head_dim = text_geometry(model.config)
    language_model, lm_head = model.model.language_model, model.lm_head
    inputs = [i.name for i in session.get_inputs()][2:]
    outputs = [o.name for o in session.get_outputs()][1:]
    tolerance = (ATOL, RTOL) if dtype == np.float32 else (FP16_ATOL, FP16_RTOL)
    generator = torch.Generator().manual_seed(3)
    worst = 0.0

    def run(embeds: np.ndarray, mask: np.ndarray, buffers: list) -> np.ndarray:
        binding = session.io_binding()
        binding.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=dtype))
        binding.bind_cpu_input(names.ATTENTION_MASK, mask)
        binding.bind_output(names.LOGITS, "cpu")
        for past, present, value in zip(inputs, outputs, buffers):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    cache_name = cache_argument(language_model)

    def reference(embeds, mask, positions, cache):
        out = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_name: cache})
        return lm_head(out.last_hidden_state[:, -1]).numpy(), out.past_key_values

    def check(case: str, got: np.ndarray, want: np.ndarray) -> None:
        nonlocal worst
        worst = max(worst, _compare(f"decoder, {case}", got, want, tolerance=tolerance))

    for lengths in FUSED_PROMPTS:
        batch, longest = len(lengths), max(lengths)
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, kv_heads, FUSED_CAPACITY, head_dim), dtype)) for _ in inputs]
        embeds = torch.randn(batch, longest, text.hidden_size, generator=generator)
        mask = torch.zeros(batch, longest, dtype=torch.long)  # transformers: left padding
        for row, n in enumerate(lengths):
            mask[row, longest - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        want, cache = reference(embeds, mask, positions, None)
        packed = np.zeros((batch, longest, text.hidden_size), np.float32)  # the graph: each row's tokens first
        ours_mask = np.zeros((batch, longest), np.int64)
        for row, n in enumerate(lengths):
            packed[row, :n] = embeds[row, longest - n :].numpy()
            ours_mask[row, :n] = 1
        check(f"prompt of lengths {lengths}", run(packed, ours_mask, buffers), want)
        held = torch.tensor(lengths)
        for step in range(DECODE_STEPS):
            token = torch.randn(batch, 1, text.hidden_size, generator=generator)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            want, cache = reference(token, mask, held[:, None], cache)
            held = held + 1
            full = (np.arange(FUSED_CAPACITY)[None] < held.numpy()[:, None]).astype(np.int64)
            check(f"step {step + 1} after lengths {lengths}", run(token.numpy(), full, buffers), want)
        if batch == 1:
            chunk = torch.randn(1, 4, text.hidden_size, generator=generator)
            mask = torch.cat([mask, torch.ones(1, 4, dtype=torch.long)], dim=1)
            want, cache = reference(chunk, mask, held[:, None] + torch.arange(4)[None], cache)
            full = (np.arange(FUSED_CAPACITY)[None] < held.numpy()[:, None] + 4).astype(np.int64)
            check(f"4-token continuation after {int(held[0])}", run(chunk.numpy(), full, buffers), want)
    return {"decoder_logits": worst}
