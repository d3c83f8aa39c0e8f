"""What both decoder kinds share: the key/value cache a generation holds (`KVCache`, with each kind's state), the
device its buffers live on, and the base that reads the decoder's shapes from the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from ..bundle.manifest import (
    KV_ROWS,
    Manifest,
    past_key_name,
    past_value_name,
    present_key_name,
    present_value_name,
    reordered_key_name,
    reordered_value_name,
)

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
KV_DTYPES = {**NUMPY_DTYPES, "int8": np.int8}  # what a key/value buffer may hold
CAPACITY_STEP = 256  # buffers grow in steps of this many positions, so nearby lengths reuse them


@dataclass
class Device:
    """Where IO-bound tensors live: ("cuda", 0) or ("cpu", 0)."""

    type: str
    id: int = 0


class ContextLengthError(ValueError):
    """The tokens to hold exceed what the decoder graph serves."""


@dataclass
class FusedState:
    """What a "gqa" cache holds for `FusedDecoder`: its buffers, and the bindings every step reuses."""

    kv: list[ort.OrtValue]  # per layer, key then value: [B, n_kv, C, head_dim], bound as both past and present
    kv_host: list[np.ndarray] | None  # the same memory as numpy arrays (the CPU); None on a device
    mask: np.ndarray  # [B, C] int64: 1 where a row holds a token (the graph works out lengths and positions from it)
    rows: np.ndarray  # [B] int64, 0 .. B-1: a step's mask entries are (rows, lengths)
    embeds_value: ort.OrtValue  # the step's `inputs_embeds [B, 1, D]` (on the CPU, `KVCache.step_embeds`' memory)
    mask_value: ort.OrtValue  # `mask` as the graph reads it
    logits_value: ort.OrtValue  # the step's `logits [B, V]` (on the host, except under CUDA graphs)
    step_binding: ort.IOBinding | None = None  # made once, after the above
    # Beam search with `kv_reorder`: a second set of buffers of `kv`'s shapes, made at the cache's first reorder and
    # freed when it is released ([] where it did not fit); on the CPU with numpy arrays as `kv_host` has them.
    scratch: list[ort.OrtValue] | None = None
    scratch_host: list[np.ndarray] | None = None
    step_options: ort.RunOptions | None = None  # under CUDA graphs: this cache's graph id (or uncaptured, after a failure)


@dataclass
class ConcatState:
    """What a "concat" cache holds for `ConcatDecoder`."""

    kv: list[Any]  # per layer, key then value: [B, n_kv, width, head_dim], numpy arrays or device OrtValues
    mask: np.ndarray  # [B, capacity] int64: the prompt's mask, then ones (a run passes its first `width` columns)
    width: int = 0  # positions the keys/values hold (padding included)


@dataclass
class KVCache:
    """The keys/values of one generation, and the per-step buffers that go with them."""

    batch: int
    capacity: int  # positions the cache can hold
    lengths: np.ndarray  # [B] int64: real tokens held per row
    step_embeds: np.ndarray  # [B, 1, D] host buffer: the caller writes the next tokens' embeddings here
    state: FusedState | ConcatState  # what the decoder kind keeps
    logits: np.ndarray | None = None  # [B, V] float32: the last step's logits (a reused buffer for "gqa")
    # Positions (in the kind's own layout) that `repeat_rows` copied: the same in every copy of a row, so a reorder
    # between copies (beam search's hypotheses of one prompt) leaves them alone.
    copied_until: int = 0


def served_positions(manifest: Manifest) -> int:
    """Positions the bundle's decoder serves: the model's, fewer where its graph was built for fewer."""
    text, spec = manifest.text, manifest.graphs["decoder"]
    return min(spec.max_length or text.max_position_embeddings, text.max_position_embeddings)


class DecoderBase:
    """Both kinds' shapes and limits, read from the manifest: layers, key/value heads, head size, widths, dtypes,
    positions served, and the graph's past/present names. `reorder`: the bundle's `kv_reorder` graph, where the
    keys/values live on a device (beam search gathers their rows there; on the host, numpy does)."""

    fixed_capacity: int | None = None  # set where the key/value buffers have one static length (FusedDecoder)

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, device: Device | None, reorder: ort.InferenceSession | None = None):
        self.session = session
        self.device = device
        self.reorder = reorder
        self.graph_failures = 0  # decode steps whose run under a CUDA graph id failed (each turns graphs off for its cache)
        text = manifest.text
        spec = manifest.graphs["decoder"]
        self.num_layers = text.num_layers
        self.kv_heads, self.head_dim, self.hidden_size, self.vocab_size = text.num_key_value_heads, text.head_dim, text.hidden_size, text.vocab_size
        self.dtype = NUMPY_DTYPES[spec.dtype]
        self.kv_dtype = KV_DTYPES[spec.kv_dtype or spec.dtype]
        self.max_length = served_positions(manifest)
        self.past_names = [n for layer in range(self.num_layers) for n in (past_key_name(layer), past_value_name(layer))]
        self.present_names = [n for layer in range(self.num_layers) for n in (present_key_name(layer), present_value_name(layer))]
        self.reordered_names = [n for layer in range(self.num_layers) for n in (reordered_key_name(layer), reordered_value_name(layer))]

    def _gather_rows(self, sources: list[ort.OrtValue], rows: np.ndarray, targets: list[ort.OrtValue] | None) -> list[ort.OrtValue]:
        """One run of `kv_reorder` where the keys/values live: row b of each result is row `rows[b]` of its source.
        `targets`: buffers to write into (their shapes); None: new tensors on the device. Returns the results."""
        binding = self.reorder.io_binding()
        binding.bind_cpu_input(KV_ROWS, np.ascontiguousarray(rows, dtype=np.int64))
        for index, (source, name) in enumerate(zip(sources, self.reordered_names)):
            binding.bind_ortvalue_input(self.past_names[index], source)
            if targets is None:
                binding.bind_output(name, self.device.type, self.device.id)
            else:
                binding.bind_ortvalue_output(name, targets[index])
        self.reorder.run_with_iobinding(binding)
        return targets if targets is not None else binding.get_outputs()

    def discard(self, cache: KVCache) -> None:
        """Takes back a cache not to be reused as the next generation's (a second cache beside the answer's, such as
        guidance's); most decoders let it go (see `FusedDecoder`'s)."""

    def release_from_finalizer(self, cache: KVCache) -> None:
        """Takes back a cache whose holder was garbage collected (see `FusedDecoder`'s); most decoders let it go."""

    def check_length(self, positions: int) -> None:
        if positions > self.max_length:
            raise ContextLengthError(f"{positions} positions asked for; this decoder serves at most {self.max_length}")

    def _capacity(self, needed: int) -> int:
        self.check_length(needed)
        return min(-(-needed // CAPACITY_STEP) * CAPACITY_STEP, self.max_length)
