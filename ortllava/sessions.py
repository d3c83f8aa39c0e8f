"""onnxruntime sessions of a bundle: provider choice, the vision path, and the decoder step.

Two ways to run the decoder, one interface:
- host mode (CPU execution provider by default): numpy in, numpy out; the present keys/values returned
  by one step are fed, as they are, as the next step's past.
- IO binding (always on CUDA, selectable on CPU for tests): keys/values stay as device `OrtValue`s
  between steps; only the small per-step inputs go to the device and only the last position's logits
  come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .manifest import (
    ATTENTION_MASK,
    IMAGE_FEATURES,
    INPUTS_EMBEDS,
    LOGITS,
    PIXEL_VALUES,
    POSITION_IDS,
    PROJECTED_FEATURES,
    BundleError,
    GraphSpec,
    Manifest,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def resolve_providers(provider: str) -> list[str]:
    """"auto" -> CUDA when this onnxruntime has it, else CPU; "cuda" insists on CUDA; "cpu" is CPU."""
    available = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(
                "provider='cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install onnxruntime-gpu (pip install 'ortllava[gpu]')"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    raise ValueError(f"provider must be 'auto', 'cpu' or 'cuda', got {provider!r}")


def create_session(path: Path, providers: list[str], threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for damaged graphs
        raise BundleError(f"onnxruntime cannot load graph {path.name}: {error}") from error


def _check_io(session: ort.InferenceSession, spec: GraphSpec, name: str) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != spec.inputs or outputs != spec.outputs:
        raise BundleError(
            f"graph {spec.file} ({name}) does not match the manifest: inputs {inputs} vs {spec.inputs}, "
            f"outputs {outputs} vs {spec.outputs}"
        )


@dataclass
class Device:
    """Where IO-bound tensors live: ("cuda", 0) or ("cpu", 0)."""

    type: str
    id: int = 0


class VisionPath:
    """Tiles -> projected features: `[n_tiles, 3, S, S]` -> `[n_tiles, n_patches, D]`, all tiles in one run."""

    def __init__(self, encoder: ort.InferenceSession, projector: ort.InferenceSession, device: Device | None, dtype: Any):
        self.encoder = encoder
        self.projector = projector
        self.device = device
        self.dtype = dtype

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, dtype=self.dtype)
        if self.device is None:
            (features,) = self.encoder.run([IMAGE_FEATURES], {PIXEL_VALUES: tiles})
            (projected,) = self.projector.run([PROJECTED_FEATURES], {IMAGE_FEATURES: features})
            return projected
        # The encoder's output stays on the device and feeds the projector directly.
        binding = self.encoder.io_binding()
        binding.bind_cpu_input(PIXEL_VALUES, tiles)
        binding.bind_output(IMAGE_FEATURES, self.device.type, self.device.id)
        self.encoder.run_with_iobinding(binding)
        features = binding.get_outputs()[0]
        binding = self.projector.io_binding()
        binding.bind_ortvalue_input(IMAGE_FEATURES, features)
        binding.bind_output(PROJECTED_FEATURES, "cpu")
        self.projector.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


class Decoder:
    """One decoder step: (embeds, mask, positions, past) -> (last-position logits `[B, V]`, present).

    The cache is a list of `2 * num_layers` arrays (host mode) or `OrtValue`s (IO binding), in the
    order key 0, value 0, key 1, value 1, ...; each `[B, n_kv_heads, P, head_dim]`.
    """

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, device: Device | None):
        self.session = session
        self.device = device
        text = manifest.text
        self.num_layers = text.num_layers
        self.kv_shape = (text.num_key_value_heads, text.head_dim)
        self.dtype = _NUMPY_DTYPES[manifest.graphs["decoder"].dtype]
        self.past_names = [n for layer in range(self.num_layers) for n in (past_key_name(layer), past_value_name(layer))]
        self.present_names = [n for layer in range(self.num_layers) for n in (present_key_name(layer), present_value_name(layer))]
        self.output_names = [LOGITS] + self.present_names

    def empty_cache(self, batch: int) -> list[Any]:
        shape = (batch, self.kv_shape[0], 0, self.kv_shape[1])
        if self.device is None:
            return [np.zeros(shape, dtype=self.dtype) for _ in self.past_names]
        return [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device.type, self.device.id) for _ in self.past_names]

    def __call__(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: list[Any]) -> tuple[np.ndarray, list[Any]]:
        """`inputs_embeds [B, S, D]`, `attention_mask [B, P + S]`, `position_ids [B, S]` -> logits `[B, V]`, cache of length P + S."""
        if self.device is None:
            feed = {INPUTS_EMBEDS: inputs_embeds, ATTENTION_MASK: attention_mask, POSITION_IDS: position_ids}
            feed.update(zip(self.past_names, cache))
            logits, *present = self.session.run(self.output_names, feed)
            return logits, present
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUTS_EMBEDS, inputs_embeds)
        binding.bind_cpu_input(ATTENTION_MASK, attention_mask)
        binding.bind_cpu_input(POSITION_IDS, position_ids)
        for name, value in zip(self.past_names, cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(LOGITS, "cpu")  # only the last position's logits cross to the host
        for name in self.present_names:
            binding.bind_output(name, self.device.type, self.device.id)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present


class BundleSessions:
    """The three graphs of a bundle, loaded for one provider."""

    def __init__(self, bundle: Path, manifest: Manifest, provider: str = "auto", io_binding: bool | None = None, threads: int | None = None):
        self.providers = resolve_providers(provider)
        on_cuda = self.providers[0] == "CUDAExecutionProvider"
        if io_binding is None:
            io_binding = on_cuda
        device = Device("cuda" if on_cuda else "cpu") if io_binding else None
        self.device = device
        sessions = {}
        for name in ("vision_encoder", "projector", "decoder"):
            spec = manifest.graphs[name]
            sessions[name] = create_session(bundle / spec.file, self.providers, threads)
            _check_io(sessions[name], spec, name)
        vision_dtype = _NUMPY_DTYPES[manifest.graphs["vision_encoder"].dtype]
        self.vision = VisionPath(sessions["vision_encoder"], sessions["projector"], device, vision_dtype)
        self.decoder = Decoder(sessions["decoder"], manifest, device)

    @property
    def provider(self) -> str:
        return self.providers[0]
