"""Each exported graph against PyTorch, on input shapes not used for tracing.

Two halves, so the exporter never holds the PyTorch model and a graph's onnxruntime session at once (for a
large model each is a full copy of its weights): `references(model, kind)` runs PyTorch on the cases and keeps
inputs and outputs (a few MB); `check(references, graph paths)` later runs the graphs on them and compares.

Tolerance (fp32): |onnx - torch| <= ATOL * max(1, max|torch|) + RTOL * |torch| elementwise. Both run the
same fp32 math in a different order. On small models the differences are ~1e-6 relative, but they grow with
depth, width and context: on a 10-layer, 1536-wide random model at 1100 tokens PyTorch's own fp32 logits differ
from fp64 by 4e-3 (the graph by 7e-3, every argmax the same). 1e-3 of the largest value, + 1e-3 relative, stays
clear of that and still catches wiring faults (a wrong mask, position or layer; the tests' rotary table one
position off and q/k/v weights 2% too large). fp32 validation is the wiring check: fp16 graphs get a bound wide
enough for half precision (below), which shows overflows and gross faults but not small ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ortllava.bundle import manifest as names
from ortllava.bundle import sessions as runtime_sessions

from ..graphs.convert import decoder_example, decoder_io_names
from ..graphs.wrappers import Decoder, Projector, VisionEncoder, cache_argument, output_cache, text_geometry

ATOL, RTOL = 1e-3, 1e-3
# fp16 graphs are held to their own bound against the fp32 model: half precision keeps ~3 significant
# digits, and errors grow through the layers. It catches overflows and gross faults (a wrong layer or weight
# layout), not small ones: a sliding window one position off (~7e-3) passes. The graphs are written by the same
# code at every precision, and the fp32 check (and the tests) is what checks their wiring.
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


def _session(path: Path, fp16: bool = False) -> ort.InferenceSession:
    """A CPU session that checks the graph with its weights as stored: memory-mapped, not repacked, and fp16 ones
    cast as they are read rather than into an fp32 copy at load. The checks run a few times, and the export
    then holds no second copy of the weights."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16 graphs on the CPU warn about casts they insert
    runtime_sessions.leave_weights_unpacked(options)
    if fp16:
        runtime_sessions.cast_fp16_weights_as_read(options)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class VisionCase:
    pixels: np.ndarray  # [tiles, 3, H, W] float32
    features: np.ndarray  # PyTorch's vision encoder output: the encoder's reference and the projector's input
    projected: np.ndarray  # PyTorch's projector output


@dataclass
class DecoderRun:
    """One run of a decoder graph: its inputs (numpy, as the graph takes them) and PyTorch's outputs."""

    name: str
    feed: dict[str, np.ndarray]
    want: list[np.ndarray]  # logits, then (concat graphs) the present keys/values
    real: np.ndarray | None = None  # concat: [B, 1, P + S, 1] bool, the positions whose keys/values count


@dataclass
class FusedSequence:
    """Runs of a fused graph over the same shared buffers: a prompt, decode steps, maybe a continuation."""

    batch: int
    runs: list[DecoderRun] = field(default_factory=list)


@dataclass
class References:
    """PyTorch's side of the validation: what `check` compares the graphs with."""

    vision: list[VisionCase]
    decoder_kind: str  # "gqa" (FusedSequence cases) or "concat" (DecoderRun cases)
    decoder: list
    kv_heads: int
    head_dim: int


@torch.no_grad()
def references(model, decoder_kind: str) -> References:
    """Runs PyTorch (fp32) on every validation case of the vision graphs and the decoder of `decoder_kind`."""
    _, kv_heads, head_dim = text_geometry(model.config)
    decoder = _fused_decoder_cases(model) if decoder_kind == "gqa" else _decoder_cases(model)
    return References(_vision_cases(model), decoder_kind, decoder, kv_heads, head_dim)


def check(refs: References, encoder_path: Path, projector_path: Path, decoder_path: Path, dtype=np.float32) -> dict[str, float]:
    """Runs the graphs on the references' inputs; raises `ExportValidationError` where one differs beyond the
    tolerance (fp16 graphs: fp16 inputs and the fp16 bound). Returns the largest differences."""
    tolerance = (ATOL, RTOL) if dtype == np.float32 else (FP16_ATOL, FP16_RTOL)
    worst = _check_vision(refs.vision, encoder_path, projector_path, dtype, tolerance)
    if refs.decoder_kind == "gqa":
        worst.update(_check_fused_decoder(refs, decoder_path, dtype, tolerance))
    else:
        worst.update(_check_decoder(refs.decoder, decoder_path))
    return worst


# -- vision -------------------------------------------------------------------------------------------


def _vision_cases(model) -> list[VisionCase]:
    """1 and 3 tiles of random pixels."""
    torch_encoder, torch_projector = VisionEncoder(model).eval(), Projector(model).eval()
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(1)
    cases = []
    for tiles in VISION_TILES:
        pixels = torch.randn(tiles, 3, size, size, generator=generator)
        features = torch_encoder(pixels)
        cases.append(VisionCase(pixels.numpy(), features.numpy(), torch_projector(features).numpy()))
    return cases


def _check_vision(cases: list[VisionCase], encoder_path: Path, projector_path: Path, dtype, tolerance) -> dict[str, float]:
    fp16 = dtype == np.float16
    encoder, projector = _session(encoder_path, fp16), _session(projector_path, fp16)
    worst = {"vision_encoder": 0.0, "projector": 0.0}
    for case in cases:
        tiles = len(case.pixels)
        (got,) = encoder.run(None, {names.PIXEL_VALUES: case.pixels.astype(dtype)})
        worst["vision_encoder"] = max(worst["vision_encoder"], _compare(f"vision_encoder ({tiles} tiles)", got, case.features, tolerance=tolerance))
        (got,) = projector.run(None, {names.IMAGE_FEATURES: case.features.astype(dtype)})
        worst["projector"] = max(worst["projector"], _compare(f"projector ({tiles} tiles)", got, case.projected, tolerance=tolerance))
    return worst


# -- concat decoder -----------------------------------------------------------------------------------


def _decoder_cases(model) -> list[DecoderRun]:
    module = Decoder(model).eval()
    input_names, _ = decoder_io_names(text_geometry(model.config)[0])
    generator = torch.Generator().manual_seed(2)
    runs = []
    for batch, seq, past, padding in DECODER_CASES:
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        mask[0, :padding] = 0
        embeds, mask, positions, cache = decoder_example(model, batch, seq, past, mask, generator)
        want = [tensor.numpy() for tensor in module(embeds, mask, positions, cache)]
        feed = dict(zip(input_names, [embeds.numpy(), mask.numpy(), positions.numpy(), *[c.numpy() for c in cache]]))
        # Padded positions attend to nothing; their keys/values are never read, and frameworks fill them differently.
        real = mask.numpy().astype(bool)[:, None, :, None]
        runs.append(DecoderRun(f"decoder (batch {batch}, {seq} new, {past} past, {padding} padded)", feed, want, real))
    return runs


def _check_decoder(runs: list[DecoderRun], decoder_path: Path) -> dict[str, float]:
    session = _session(decoder_path)
    worst_logits = worst_cache = 0.0
    for run in runs:
        got = session.run(None, run.feed)
        worst_logits = max(worst_logits, _compare(f"{run.name} logits", got[0], run.want[0]))
        for index, (g, w) in enumerate(zip(got[1:], run.want[1:])):
            where = np.broadcast_to(run.real, g.shape)
            worst_cache = max(worst_cache, _compare(f"{run.name} present {index}", g, w, where))
    return {"decoder_logits": worst_logits, "decoder_present": worst_cache}


# -- fused decoder ------------------------------------------------------------------------------------

# Fused ("gqa") decoder cases. Prompts: right-padded rows of these lengths, one beyond a 1024-token sliding
# window; then DECODE_STEPS single-token steps with the mask at the buffer's full width (as the runtime
# runs them); then, for one row, a 4-token continuation (a chat's next turn). With fp32 activations the two
# attention forms are both checked (export/graphs/attention.py): the short rows' steps run GroupQueryAttention (their
# buffer is mostly free), the 1100-token row's run the standard-op form (its buffer is mostly filled).
FUSED_PROMPTS = [[9, 5, 1], [1100]]
DECODE_STEPS = 3
FUSED_CAPACITY = 1200


def _fused_decoder_cases(model) -> list[FusedSequence]:
    """transformers' language model on the cases above, with inputs laid out as the runtime feeds the graph."""
    text = model.config.text_config
    language_model, lm_head = model.model.language_model, model.lm_head
    cache_name = cache_argument(language_model)
    generator = torch.Generator().manual_seed(3)

    def reference(embeds, mask, positions, cache):
        out = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_name: cache})
        return lm_head(out.last_hidden_state[:, -1]).numpy(), output_cache(out)

    sequences = []
    for lengths in FUSED_PROMPTS:
        batch, longest = len(lengths), max(lengths)
        sequence = FusedSequence(batch)
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
        sequence.runs.append(DecoderRun(f"prompt of lengths {lengths}", _fused_feed(packed, ours_mask), [want]))
        held = torch.tensor(lengths)
        for step in range(DECODE_STEPS):
            token = torch.randn(batch, 1, text.hidden_size, generator=generator)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            want, cache = reference(token, mask, held[:, None], cache)
            held = held + 1
            full = (np.arange(FUSED_CAPACITY)[None] < held.numpy()[:, None]).astype(np.int64)
            sequence.runs.append(DecoderRun(f"step {step + 1} after lengths {lengths}", _fused_feed(token.numpy(), full), [want]))
        if batch == 1:
            chunk = torch.randn(1, 4, text.hidden_size, generator=generator)
            mask = torch.cat([mask, torch.ones(1, 4, dtype=torch.long)], dim=1)
            want, cache = reference(chunk, mask, held[:, None] + torch.arange(4)[None], cache)
            full = (np.arange(FUSED_CAPACITY)[None] < held.numpy()[:, None] + 4).astype(np.int64)
            sequence.runs.append(DecoderRun(f"4-token continuation after {int(held[0])}", _fused_feed(chunk.numpy(), full), [want]))
        sequences.append(sequence)
    return sequences


def _fused_feed(embeds: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {names.INPUTS_EMBEDS: embeds, names.ATTENTION_MASK: mask}


def _check_fused_decoder(refs: References, decoder_path: Path, dtype, tolerance) -> dict[str, float]:
    """Runs the fused graph the way the runtime does (shared buffers, IO binding) on each sequence."""
    session = _session(decoder_path, dtype == np.float16)
    inputs = [i.name for i in session.get_inputs()][2:]
    outputs = [o.name for o in session.get_outputs()][1:]
    worst = 0.0
    for sequence in refs.decoder:
        shape = (sequence.batch, refs.kv_heads, FUSED_CAPACITY, refs.head_dim)
        buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype)) for _ in inputs]
        for run in sequence.runs:
            binding = session.io_binding()
            binding.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(run.feed[names.INPUTS_EMBEDS], dtype=dtype))
            binding.bind_cpu_input(names.ATTENTION_MASK, run.feed[names.ATTENTION_MASK])
            binding.bind_output(names.LOGITS, "cpu")
            for past, present, value in zip(inputs, outputs, buffers):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            session.run_with_iobinding(binding)
            worst = max(worst, _compare(f"decoder, {run.name}", binding.get_outputs()[0].numpy(), run.want[0], tolerance=tolerance))
    return {"decoder_logits": worst}
