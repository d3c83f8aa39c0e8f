"""`FusedDecoder`: drives a "gqa" decoder graph (GroupQueryAttention over preallocated key/value buffers shared by
past and present; see the package's docstring)."""

from __future__ import annotations

import collections
import threading

import numpy as np
import onnxruntime as ort

from ..bundle.manifest import ATTENTION_MASK, INPUTS_EMBEDS, LOGITS, Manifest
from ..warn import warn
from .cache import ContextLengthError, DecoderBase, Device, FusedState, KVCache

# On the CPU, a one-row prompt (or a chat turn's continuation) longer than this runs in chunks of this many tokens: the CPU
# GroupQueryAttention computes whole query x key rectangles, so chunks skip most of the causal upper triangle
# (benchmark model, 2160 tokens, 2 threads, chunk sizes alternating in one process, median of 6: 878 ms
# whole; 768-783 ms in chunks of 320-384, 798 at 448, 800-830 at 512, 826 at 768; int4: 857 at 384, 913 at 512).
CPU_PREFILL_CHUNK = 384


def _shape(embeds: np.ndarray | ort.OrtValue) -> tuple[int, ...]:
    """The shape of prompt embeddings held by the host (an array) or by the device (an OrtValue)."""
    return tuple(embeds.shape()) if isinstance(embeds, ort.OrtValue) else embeds.shape


class FusedDecoder(DecoderBase):
    """Drives a "gqa" decoder graph: shared, preallocated key/value buffers; one IO binding per step."""

    def __init__(
        self, session: ort.InferenceSession, manifest: Manifest, device: Device | None, capacity: int | None = None, cuda_graph: bool = False,
        reorder: ort.InferenceSession | None = None,
    ):
        super().__init__(session, manifest, device, reorder)
        self.device = device or Device("cpu")
        if capacity and capacity > self.max_length:
            warn(f"max_length={capacity} is more than the {self.max_length} positions this decoder serves: its buffers hold {self.max_length}")
        self.fixed_capacity = min(capacity, self.max_length) if capacity else None  # static shapes: always this many positions
        if self.fixed_capacity:  # then no generation holds more: requests are checked against it up front
            self.max_length = self.fixed_capacity
        self._spare: KVCache | None = None  # the last cache, whose buffers the next generation may reuse
        # Under CUDA graphs, each cache's decode step is captured under its own graph id, and onnxruntime keeps a
        # captured graph (and the memory it ran in) until the session ends: it has no call to free one. So such caches
        # are not let go: released ones wait here by batch size for the next generation of that size, and a chat
        # collected with its cache gives it back through `_dropped` (`release_from_finalizer`). The graphs (and
        # buffers kept) are then, for each batch size, as many as the caches of that size in use at once, rather than
        # one more for each generation whose batch size differs from the last one's.
        self._graph_caches: dict[int, list[KVCache]] = {}
        self._dropped: collections.deque[KVCache] = collections.deque()
        self._lock = threading.Lock()  # generations may run in several threads: the spare and graph ids go to one each
        # CUDA graphs: each cache's decode step is captured once (graph id per cache) and replayed; prompts
        # (other shapes) run uncaptured (id -1). A failed capture turns graphs off for that cache's steps.
        self.cuda_graph = cuda_graph
        self._graph_ids = 0
        self._uncaptured = ort.RunOptions()
        self._uncaptured.add_run_config_entry("gpu_graph_id", "-1")
        # Beam search's reorder keeps the buffers where the step binding has them (a captured step reads them there).
        self.keep_buffer_addresses = cuda_graph

    # -- buffers --------------------------------------------------------------------------------------

    def _value(self, array: np.ndarray) -> ort.OrtValue:
        """An OrtValue for `array`: the same memory on the CPU, a device copy elsewhere (refreshed with `update_inplace`)."""
        if self.device.type == "cpu":
            return ort.OrtValue.ortvalue_from_numpy(array)
        return ort.OrtValue.ortvalue_from_numpy(array, self.device.type, self.device.id)

    def _empty_like(self, value: ort.OrtValue) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), self.kv_dtype, self.device.type, self.device.id)

    def _sync(self, value: ort.OrtValue, array: np.ndarray) -> None:
        if self.device.type != "cpu":
            value.update_inplace(array)

    def release(self, cache: KVCache) -> None:
        """Hands a finished generation's buffers back, for the next one to reuse (less beam search's second set)."""
        if not self.cuda_graph:
            cache.state.scratch = cache.state.scratch_host = None
            self._spare = cache
            return
        with self._lock:
            self._keep(cache)

    def discard(self, cache: KVCache) -> None:
        """A cache not to become the spare: dropped, except under CUDA graphs, where every cache is kept with its
        captured step for reuse (`release`)."""
        if self.cuda_graph:
            self.release(cache)

    def release_from_finalizer(self, cache: KVCache) -> None:
        """`release` for a finalizer (a chat collected with its cache): under CUDA graphs the cache joins the kept
        ones at the next `_new_cache`. It takes no lock, since a collection may run while this thread holds it."""
        if self.cuda_graph:
            self._dropped.append(cache)  # (a deque's append is atomic)

    def _keep(self, cache: KVCache) -> None:
        """Under CUDA graphs, with the lock held: `cache` waits for the next generation of its batch size."""
        cache.state.scratch = cache.state.scratch_host = None
        kept = self._graph_caches.setdefault(cache.batch, [])
        if not any(other is cache for other in kept):  # (released twice, it must still be handed out once)
            kept.append(cache)

    def _new_cache(self, batch: int, capacity: int) -> KVCache:
        with self._lock:  # a cache in use is never handed out twice
            if self.cuda_graph:
                while self._dropped:
                    self._keep(self._dropped.popleft())
                kept = self._graph_caches.get(batch)
                spare = kept.pop() if kept else None
            else:
                spare, self._spare = self._spare, None
        if spare is not None and spare.batch == batch and spare.capacity >= capacity:
            cache = spare
            cache.copied_until = 0
            cache.lengths[:] = 0
            cache.state.mask[:] = 0
            self._sync(cache.state.mask_value, cache.state.mask)
            return cache
        del spare  # let the old buffers go before allocating new ones (never a captured one: capacities are fixed)
        capacity = self.fixed_capacity or capacity  # (`_capacity` checked the request against it)
        kv_shape = (batch, self.kv_heads, capacity, self.head_dim)
        if self.device.type == "cpu":  # numpy arrays the OrtValues share: the host can read and write them
            kv_host = [np.zeros(kv_shape, self.kv_dtype) for _ in self.past_names]
            kv = [ort.OrtValue.ortvalue_from_numpy(array) for array in kv_host]
        else:
            kv_host = None
            kv = [ort.OrtValue.ortvalue_from_shape_and_type(kv_shape, self.kv_dtype, self.device.type, self.device.id) for _ in self.past_names]
        step_embeds = np.zeros((batch, 1, self.hidden_size), self.dtype)
        mask = np.zeros((batch, capacity), np.int64)
        logits = np.zeros((batch, self.vocab_size), np.float32)
        state = FusedState(
            kv, kv_host, mask, np.arange(batch), self._value(step_embeds), self._value(mask),
            # Logits land in host memory directly, except under CUDA graphs, whose outputs must stay on the device.
            self._value(logits) if self.cuda_graph else ort.OrtValue.ortvalue_from_numpy(logits),
        )
        cache = KVCache(batch, capacity, np.zeros(batch, np.int64), step_embeds, state, logits)
        if self.cuda_graph:
            with self._lock:
                self._graph_ids += 1
                graph_id = self._graph_ids
            state.step_options = ort.RunOptions()
            state.step_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        # The decode step's binding, made once: every step reads and writes the same buffers.
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUTS_EMBEDS, state.embeds_value)
        binding.bind_ortvalue_input(ATTENTION_MASK, state.mask_value)
        self._bind_cache(binding, cache)
        state.step_binding = binding
        return cache

    def _bind_cache(self, binding: ort.IOBinding, cache: KVCache) -> None:
        for past, present, value in zip(self.past_names, self.present_names, cache.state.kv):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)  # the same memory: the op writes in place
        binding.bind_ortvalue_output(LOGITS, cache.state.logits_value)

    def _run(self, inputs_embeds: np.ndarray | ort.OrtValue, mask: np.ndarray, cache: KVCache) -> np.ndarray:
        """One run with freshly bound embeddings (from the host, or where the device holds them) and mask (prompts);
        the cache stays bound in place."""
        binding = self.session.io_binding()
        if isinstance(inputs_embeds, ort.OrtValue):
            binding.bind_ortvalue_input(INPUTS_EMBEDS, inputs_embeds)
        else:
            binding.bind_cpu_input(INPUTS_EMBEDS, np.ascontiguousarray(inputs_embeds, dtype=self.dtype))
        binding.bind_cpu_input(ATTENTION_MASK, mask)
        self._bind_cache(binding, cache)
        self.session.run_with_iobinding(binding, self._uncaptured if self.cuda_graph else None)
        return self._logits(cache)

    def _logits(self, cache: KVCache) -> np.ndarray:
        if self.cuda_graph:
            cache.logits[...] = cache.state.logits_value.numpy()
        return cache.logits

    # -- the interface --------------------------------------------------------------------------------

    def start(self, inputs_embeds: np.ndarray | ort.OrtValue, attention_mask: np.ndarray, capacity: int) -> tuple[np.ndarray, KVCache]:
        """`inputs_embeds [B, T, D]` (padded on either side; or an OrtValue where the device holds them, as the bundle's
        `feature_splice` leaves them), `attention_mask [B, T]` -> logits `[B, V]`, cache."""
        on_device = isinstance(inputs_embeds, ort.OrtValue)
        batch, length, _ = _shape(inputs_embeds)
        cache = self._new_cache(batch, self._capacity(max(capacity, length)))
        real = attention_mask.astype(bool)
        counts = real.sum(axis=1)
        chunk = self._prefill_chunk
        if on_device and (not real.all() or batch == 1 and chunk and counts[0] > chunk):  # (moved or cut below: on the host)
            inputs_embeds = inputs_embeds.numpy()
        if not real.all():  # the op reads each row's tokens from the start: move them there
            packed = np.zeros_like(inputs_embeds)
            for row in range(batch):
                packed[row, : counts[row]] = inputs_embeds[row, real[row]]
            inputs_embeds = packed
        if batch == 1 and chunk and counts[0] > chunk:  # (the op continues several tokens for one row only)
            self._first_prompt(inputs_embeds[:, :chunk], counts.clip(max=chunk), cache)
            return self.extend(inputs_embeds[:, chunk : int(counts[0])], cache), cache
        return self._first_prompt(inputs_embeds, counts, cache), cache

    @property
    def _prefill_chunk(self) -> int:
        """Tokens per run of a long one-row prompt or continuation (0: all at once); see CPU_PREFILL_CHUNK."""
        return CPU_PREFILL_CHUNK if self.device.type == "cpu" else 0

    def _first_prompt(self, inputs_embeds: np.ndarray | ort.OrtValue, counts: np.ndarray, cache: KVCache) -> np.ndarray:
        """Runs `inputs_embeds [B, S, D]` (row b's `counts[b]` tokens first) into an empty cache."""
        batch, length, _ = _shape(inputs_embeds)
        cache.lengths[:] = counts
        mask = cache.state.mask
        mask[:] = 0
        for row in range(batch):
            mask[row, : counts[row]] = 1
        self._sync(cache.state.mask_value, mask)
        # A first prompt is told apart by mask width == sequence length; its rows are right-padded.
        prompt_mask = np.ascontiguousarray(mask[:, :length])
        return self._run(inputs_embeds, prompt_mask, cache)

    def step(self, cache: KVCache) -> np.ndarray:
        """One token per row, embeddings already in `cache.step_embeds` -> logits `[B, V]` (a reused buffer)."""
        if int(cache.lengths.max()) + 1 > cache.capacity:
            raise ContextLengthError(f"the cache holds {cache.capacity} positions and is full")
        state = cache.state
        state.mask[state.rows, cache.lengths] = 1
        cache.lengths += 1
        try:  # (on a device, an earlier kernel's error may surface at these copies)
            self._sync(state.embeds_value, cache.step_embeds)
            self._sync(state.mask_value, state.mask)
            if not self.cuda_graph:
                self.session.run_with_iobinding(state.step_binding)
                return cache.logits
            return self._captured_step(cache)
        except BaseException:  # the cache holds what it held before (a chat or the prefix cache may keep it)
            cache.lengths -= 1
            state.mask[state.rows, cache.lengths] = 0
            self._sync(state.mask_value, state.mask)
            raise

    def _captured_step(self, cache: KVCache) -> np.ndarray:
        """A decode step under CUDA graphs: onnxruntime runs the first steps of a graph id plainly, then captures
        the step and replays it. Where a run under the graph id fails (a capture that fails comes at the second or a
        later run), that step reruns uncaptured, and so do the cache's later steps."""
        state = cache.state
        if state.step_options is self._uncaptured:
            self.session.run_with_iobinding(state.step_binding, self._uncaptured)
            return self._logits(cache)
        try:
            self.session.run_with_iobinding(state.step_binding, state.step_options)
        except Exception as error:  # noqa: BLE001 - onnxruntime's own types; the step is rerun uncaptured
            warn(f"a decode step under CUDA graphs failed ({error}); continuing without CUDA graphs")
            self.graph_failures += 1
            state.step_options = self._uncaptured
            self.session.run_with_iobinding(state.step_binding, self._uncaptured)
        return self._logits(cache)

    def extend(self, inputs_embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        """Appends `inputs_embeds [1, S, D]` to a one-row cache -> logits `[1, V]` of the last of them (in runs of
        `_prefill_chunk` tokens where that is set: a chat turn's new image as a long prompt's).

        The cache must have room (`reserve` first: it may return a new, larger cache).
        """
        if int(cache.lengths[0]) + inputs_embeds.shape[1] > cache.capacity:
            raise ContextLengthError(f"the cache holds {cache.capacity} positions: reserve room before extending it")
        chunk = self._prefill_chunk or inputs_embeds.shape[1]
        for begin in range(0, inputs_embeds.shape[1], chunk):
            logits = self._extend_once(inputs_embeds[:, begin : begin + chunk], cache)
        return logits

    def _extend_once(self, inputs_embeds: np.ndarray, cache: KVCache) -> np.ndarray:
        start = int(cache.lengths[0])
        cache.lengths[0] += inputs_embeds.shape[1]
        cache.state.mask[0, start : cache.lengths[0]] = 1
        try:
            self._sync(cache.state.mask_value, cache.state.mask)
            return self._run(inputs_embeds, cache.state.mask, cache)
        except BaseException:  # the cache holds what it held before
            self.truncate(cache, start)
            raise

    def truncate(self, cache: KVCache, length: int) -> None:
        cache.lengths[0] = min(int(cache.lengths[0]), length)
        cache.state.mask[0, cache.lengths[0] :] = 0
        self._sync(cache.state.mask_value, cache.state.mask)

    def repeat_rows(self, cache: KVCache, copies: int) -> KVCache:
        """A cache of `cache.batch × copies` rows: row b's keys/values in rows b·copies … (b+1)·copies − 1 (one
        prefill per prompt for `num_return_sequences`); `cache` is released."""
        if copies == 1:
            return cache
        repeated = self._new_cache(cache.batch * copies, cache.capacity)
        self._copy_held(cache, repeated, copies)
        repeated.copied_until = int(cache.lengths.min())  # (each row holds its tokens from position 0)
        self.release(cache)
        return repeated

    def reorder_rows(self, cache: KVCache, rows: np.ndarray) -> None:
        """Row i takes over what row `rows[i]` holds (keys/values, length, mask). Both rows are copies of one row
        (`repeat_rows`: beam search's hypotheses of a prompt), so the positions copied then are theirs alike: on the
        host, numpy copies in place only the held positions after those, the answer so far (copying the prompt's too
        moved 36 MB a row each step on the benchmark model, 2.2k tokens). With the bundle's `kv_reorder` graph
        (loaded where the buffers are on a device), it gathers them there (`_gather_on_device`); on a device without
        it (an older bundle), they go through the host, a round trip of the cache a step."""
        state = cache.state
        if np.array_equal(rows, state.rows):
            return
        if self.reorder is None or not self._gather_on_device(cache, rows):
            since, held = cache.copied_until, int(cache.lengths.max())
            if self.device.type == "cpu":
                for buffer in state.kv_host:
                    buffer[:, :, since:held] = buffer[rows, :, since:held]
            else:
                for value in state.kv:
                    host = value.numpy()
                    host[:, :, since:held] = host[rows, :, since:held]
                    value.update_inplace(host)
        cache.lengths[:] = cache.lengths[rows]
        cache.state.mask[:] = cache.state.mask[rows]
        self._sync(cache.state.mask_value, cache.state.mask)

    def _gather_on_device(self, cache: KVCache, rows: np.ndarray) -> bool:
        """`kv_reorder` gathers the rows from the buffers into a second set of the same shapes (made at the cache's
        first reorder, freed when it is released). Then the two sets swap and the step binding is rebound (one run a
        step), or, where the buffers must keep their addresses (CUDA graphs), the result is copied back (a second
        run). Whole capacities are copied: the graph's shapes are the buffers'. False where the second set does not
        fit in the device's memory (warned of once per cache: the caller goes through the host)."""
        state = cache.state
        if state.scratch is None:
            try:
                if self.device.type == "cpu":  # (numpy-backed, as `kv_host`)
                    state.scratch_host = [np.empty_like(buffer) for buffer in state.kv_host]
                    state.scratch = [ort.OrtValue.ortvalue_from_numpy(buffer) for buffer in state.scratch_host]
                else:
                    state.scratch = [self._empty_like(value) for value in state.kv]
            except Exception as error:  # noqa: BLE001 - onnxruntime's own types (an allocation that failed)
                warn(f"beam search reorders the key/value cache through the host: no room for a second copy on the device ({error})")
                state.scratch = []
        if not state.scratch:
            return False
        self._gather_rows(state.kv, rows, state.scratch)
        if self.keep_buffer_addresses:
            self._gather_rows(state.scratch, state.rows, state.kv)  # (rows in order: a copy)
        else:
            state.kv, state.scratch = state.scratch, state.kv
            state.kv_host, state.scratch_host = state.scratch_host, state.kv_host
            self._bind_cache(state.step_binding, cache)
        return True

    def reserve(self, cache: KVCache, positions: int) -> KVCache:
        """A cache with room for `positions` holding what `cache` holds (the same one when it fits)."""
        if positions <= cache.capacity:
            return cache
        if cache.batch != 1 or self.fixed_capacity:
            raise ContextLengthError(f"{positions} positions do not fit this cache of {cache.capacity}")
        grown = self._new_cache(1, self._capacity(positions))
        self._copy_held(cache, grown, 1)
        return grown

    def _copy_held(self, source: KVCache, target: KVCache, copies: int) -> None:
        """Copies what `source` holds (keys/values, lengths, mask) into `target`, each row `copies` times in a row
        (`target` has `copies` × the rows and at least the capacity). On a device: one round trip through the host,
        rare (a chat outgrew its buffers) or far shorter than the prefills it saves (`repeat_rows`)."""
        held = int(source.lengths.max())
        for index, (value, into) in enumerate(zip(source.state.kv, target.state.kv)):
            if self.device.type == "cpu":
                target.state.kv_host[index][:, :, :held] = np.repeat(source.state.kv_host[index][:, :, :held], copies, axis=0)
            else:
                host = np.zeros(into.shape(), self.kv_dtype)
                host[:, :, :held] = np.repeat(value.numpy()[:, :, :held], copies, axis=0)
                into.update_inplace(host)
        target.lengths[:] = np.repeat(source.lengths, copies)
        target.state.mask[:, : source.capacity] = np.repeat(source.state.mask, copies, axis=0)
        self._sync(target.state.mask_value, target.state.mask)
