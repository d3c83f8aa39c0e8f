"""The decoder graph driven step by step, for the two decoder kinds a bundle can hold (one module each; `cache.py`
holds what they share).

Both kinds have one interface (gpt-fast's `prefill` / `decode_one_token`, with the cache made explicit):
- `start(inputs_embeds, attention_mask, capacity)` runs the prompt and returns the logits of each row's last
  token and a `KVCache` with room for `capacity` positions;
- `step(cache)` runs one new token per row, whose embeddings the caller has written into `cache.step_embeds`;
- `reserve(cache, positions)` makes room (it may return a new, larger cache: use the one it returns);
- `extend(inputs_embeds, cache)` appends several tokens to a one-row cache (the next turn of a chat);
- `truncate(cache, length)` forgets a one-row cache's positions from `length` on;
- `repeat_rows(cache, copies)` gives each row `copies` rows of its own (several answers from one prefill);
- `reorder_rows(cache, rows)` makes row i hold what row `rows[i]` held (beam search's hypotheses, each step).

`FusedDecoder` ("gqa" bundles): GroupQueryAttention over key/value buffers preallocated to `capacity` and
shared by past and present, so a step allocates nothing and moves no key/value bytes; every input and output
of a step is bound once (IO binding), and a step only writes the new token's embeddings and one mask entry
per row. The buffers are reused by the next generation when they are large enough (one at a time: several
threads may generate at once, each with its own cache).

`ConcatDecoder` ("concat" bundles, the portable fallback): present = past ++ new, a new tensor each step.
"""

from __future__ import annotations

import onnxruntime as ort

from ..bundle.manifest import Manifest
from .cache import KV_DTYPES, NUMPY_DTYPES, ConcatState, ContextLengthError, Device, FusedState, KVCache, served_positions
from .concat import ConcatDecoder
from .fused import CPU_PREFILL_CHUNK, FusedDecoder

__all__ = [
    "CPU_PREFILL_CHUNK", "KV_DTYPES", "NUMPY_DTYPES", "ConcatDecoder", "ConcatState", "ContextLengthError", "Device", "FusedDecoder",
    "FusedState", "KVCache", "make_decoder", "served_positions",
]


def make_decoder(
    session: ort.InferenceSession, manifest: Manifest, device: Device | None, capacity: int | None = None, cuda_graph: bool = False,
    reorder: ort.InferenceSession | None = None,
) -> FusedDecoder | ConcatDecoder:
    """The decoder for the bundle's kind; `reorder`: its `kv_reorder` session, where the keys/values live on a device."""
    kind = manifest.graphs["decoder"].kind or "concat"
    if kind == "gqa":
        return FusedDecoder(session, manifest, device, capacity, cuda_graph, reorder)
    if kind == "concat":
        return ConcatDecoder(session, manifest, device, reorder)
    raise ValueError(f"decoder kind {kind!r} is unknown to this runtime (known: gqa, concat)")
