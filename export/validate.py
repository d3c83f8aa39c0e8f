"""Each exported graph against PyTorch, on input shapes not used for tracing.

Tolerance (fp32): |onnx - torch| <= ATOL + RTOL * |torch| elementwise. Both run the same fp32 math in a
different order; differences are ~1e-6 relative, so 1e-4 + 1e-3 relative catches any real mismatch (a
wrong mask, position or layer shows up as O(1) differences) without failing on summation order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ortllava import manifest as names

from .convert import decoder_example, decoder_io_names
from .wrappers import Decoder, Projector, VisionEncoder, text_geometry

ATOL, RTOL = 1e-4, 1e-3

# (batch, new tokens, past length, left padding of row 0): none of them the traced (2, 5, 3).
DECODER_CASES = [(1, 7, 0, 0), (3, 1, 9, 2), (2, 4, 6, 3)]
VISION_TILES = [1, 3]


class ExportValidationError(RuntimeError):
    pass


def _compare(name: str, got: np.ndarray, want: np.ndarray, where: np.ndarray | None = None) -> float:
    if got.shape != want.shape:
        raise ExportValidationError(f"{name}: ONNX shape {got.shape} != PyTorch shape {want.shape}")
    error = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bound = ATOL + RTOL * np.abs(want.astype(np.float64))
    if where is not None:
        error, bound = error[where], bound[where]
    worst = float(error.max()) if error.size else 0.0
    if (error > bound).any():
        raise ExportValidationError(f"{name}: ONNX differs from PyTorch by up to {worst:.3g} (tolerance {ATOL} + {RTOL} x |value|)")
    return worst


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@torch.no_grad()
def validate_vision(model, encoder_path: Path, projector_path: Path) -> dict[str, float]:
    encoder, projector = _session(encoder_path), _session(projector_path)
    torch_encoder, torch_projector = VisionEncoder(model).eval(), Projector(model).eval()
    size = model.config.vision_config.image_size
    worst = {"vision_encoder": 0.0, "projector": 0.0}
    generator = torch.Generator().manual_seed(1)
    for tiles in VISION_TILES:
        pixels = torch.randn(tiles, 3, size, size, generator=generator)
        want = torch_encoder(pixels)
        (got,) = encoder.run(None, {names.PIXEL_VALUES: pixels.numpy()})
        worst["vision_encoder"] = max(worst["vision_encoder"], _compare(f"vision_encoder ({tiles} tiles)", got, want.numpy()))
        (got_proj,) = projector.run(None, {names.IMAGE_FEATURES: want.numpy()})
        want_proj = torch_projector(want).numpy()
        worst["projector"] = max(worst["projector"], _compare(f"projector ({tiles} tiles)", got_proj, want_proj))
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
