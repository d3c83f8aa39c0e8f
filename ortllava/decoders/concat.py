"""`ConcatDecoder`: drives a "concat" decoder graph (present = past ++ new; the portable fallback)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from ..bundle.manifest import ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, POSITION_IDS
from .cache import ConcatState, DecoderBase, KVCache


class ConcatDecoder(DecoderBase):
    """Drives a "concat" decoder graph: each step returns present = past ++ new, fed back as the next past.

    Host mode (`device=None`): numpy in and out. IO binding: the keys/values stay as device `OrtValue`s
    between steps; only the last position's logits come back to the host.
    """

    def start(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, capacity: int) -> tuple[np.ndarray, KVCache]:
        batch, length, _ = inputs_embeds.shape
        capacity = max(capacity, length)
        self.check_length(capacity)
        shape = (batch, self.kv_heads, 0, self.head_dim)
        if self.device is None:
            empty = [np.zeros(shape, dtype=self.dtype) for _ in self.past_names]
        else:
            empty = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device.type, self.device.id) for _ in self.past_names]
        # One mask for the whole answer: the prompt's, then ones; each run passes the columns in use.
        mask = np.ones((batch, capacity), np.int64)
        mask[:, :length] = attention_mask
        cache = KVCache(batch, capacity, attention_mask.sum(axis=1).astype(np.int64), np.zeros((batch, 1, self.hidden_size), self.dtype), ConcatState(empty, mask))
        positions = attention_mask.cumsum(axis=-1) - 1
        positions = np.where(attention_mask == 0, 1, positions).astype(np.int64)  # as transformers: 1 where padded
        return self._run(inputs_embeds, positions, cache), cache

    def step(self, cache: KVCache) -> np.ndarray:
        positions = cache.lengths[:, None].copy()
        logits = self._run(cache.step_embeds, positions, cache)
        cache.lengths += 1  # after the run: one that fails leaves the cache as it was
        return logits

    def extend(self, inputs_embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        count = inputs_embeds.shape[1]
        cache = self.reserve(cache, cache.state.width + count)
        positions = (cache.lengths[0] + np.arange(count, dtype=np.int64))[None]
        logits = self._run(inputs_embeds, positions, cache)
        cache.lengths[0] += count
        return logits

    def truncate(self, cache: KVCache, length: int) -> None:
        cut = int(cache.lengths[0]) - min(int(cache.lengths[0]), length)
        if cut == 0:
            return
        width = cache.state.width - cut  # a one-row cache has no padding: width == length
        cache.state.kv = [self._slice_positions(value, width) for value in cache.state.kv]
        cache.state.width = width
        cache.lengths[0] -= cut

    def reserve(self, cache: KVCache, positions: int) -> KVCache:
        if positions > cache.capacity:
            self.check_length(positions)
            mask = np.ones((cache.batch, positions), np.int64)
            mask[:, : cache.capacity] = cache.state.mask
            cache.state.mask, cache.capacity = mask, positions
        return cache

    def release(self, cache: KVCache) -> None:
        pass  # nothing to reuse: every step makes new tensors

    def repeat_rows(self, cache: KVCache, copies: int) -> KVCache:
        """A cache of `cache.batch × copies` rows, row b's in rows b·copies … (b+1)·copies − 1 (see FusedDecoder)."""
        if copies == 1:
            return cache

        def repeated(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                return np.repeat(value, copies, axis=0)
            return ort.OrtValue.ortvalue_from_numpy(np.repeat(value.numpy(), copies, axis=0), self.device.type, self.device.id)

        batch = cache.batch * copies
        state = ConcatState([repeated(value) for value in cache.state.kv], np.repeat(cache.state.mask, copies, axis=0), cache.state.width)
        zeros = np.zeros((batch, 1, self.hidden_size), self.dtype)
        return KVCache(batch, cache.capacity, np.repeat(cache.lengths, copies), zeros, state, copied_until=cache.state.width)

    def reorder_rows(self, cache: KVCache, rows: np.ndarray) -> None:
        """Row i takes over what row `rows[i]` holds (see FusedDecoder): on the host, numpy copies the positions after
        those `repeat_rows` copied, in place; on a device, new tensors, gathered by the bundle's `kv_reorder` graph
        (else through the host)."""
        since = cache.copied_until

        def taken(value: Any) -> Any:
            if isinstance(value, np.ndarray):
                value[:, :, since:] = value[rows, :, since:]
                return value
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value.numpy()[rows]), self.device.type, self.device.id)

        on_device = self.reorder is not None and self.device is not None
        cache.state.kv = self._gather_rows(cache.state.kv, rows, None) if on_device else [taken(value) for value in cache.state.kv]
        cache.state.mask = cache.state.mask[rows]
        cache.lengths[:] = cache.lengths[rows]

    def _slice_positions(self, value: Any, width: int) -> Any:
        """Keeps the first `width` positions of a `[B, n_kv, P, head_dim]` array or OrtValue."""
        if isinstance(value, np.ndarray):
            return np.ascontiguousarray(value[:, :, :width])
        kept = np.ascontiguousarray(value.numpy()[:, :, :width])
        return ort.OrtValue.ortvalue_from_numpy(kept, self.device.type, self.device.id)

    def _run(self, inputs_embeds: np.ndarray, positions: np.ndarray, cache: KVCache) -> np.ndarray:
        width = cache.state.width + inputs_embeds.shape[1]
        mask = cache.state.mask[:, :width]
        if cache.batch > 1:
            mask = np.ascontiguousarray(mask)  # onnxruntime reads inputs as contiguous arrays
        feed_embeds = np.ascontiguousarray(inputs_embeds, dtype=self.dtype)
        if self.device is None:
            feed = {INPUTS_EMBEDS: feed_embeds, ATTENTION_MASK: mask, POSITION_IDS: positions}
            feed.update(zip(self.past_names, cache.state.kv))
            logits, *present = self.session.run([LOGITS] + self.present_names, feed)
        else:
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUTS_EMBEDS, feed_embeds)
            binding.bind_cpu_input(ATTENTION_MASK, mask)
            binding.bind_cpu_input(POSITION_IDS, positions)
            for name, value in zip(self.past_names, cache.state.kv):
                binding.bind_ortvalue_input(name, value)
            binding.bind_output(LOGITS, "cpu")  # only the last position's logits cross to the host
            for name in self.present_names:
                binding.bind_output(name, self.device.type, self.device.id)
            self.session.run_with_iobinding(binding)
            logits, *present = binding.get_outputs()
            logits = logits.numpy()
        cache.state.kv, cache.state.width = present, width
        cache.logits = logits
        return logits
