"""onnxruntime sessions of a bundle: provider choice, the vision path, and the decoder (the `decoders` package).

IO binding is always on with CUDA and for "gqa" decoders; for "concat" decoders on the CPU it can be
chosen (host mode, numpy in and out, is the default there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..decoders import NUMPY_DTYPES, Device, make_decoder, served_positions
from .manifest import (
    FEATURE_SPLICE_GRAPH,
    IMAGE_FEATURES,
    INPUTS_EMBEDS,
    KV_REORDER_GRAPH,
    LOGITS,
    PIXEL_VALUES,
    POSITION_IDS,
    PROJECTED_FEATURES,
    SPLICE_HOST_ROWS,
    SPLICE_INDEX,
    BundleError,
    GraphSpec,
    Manifest,
    past_key_name,
)
from ..warn import warn


def is_provider(name: Any) -> bool:
    """Whether `name` is a provider ortllava takes: "auto", "cpu", "cuda" or "cuda:N" (GPU N)."""
    return isinstance(name, str) and (name in ("auto", "cpu", "cuda") or name.startswith("cuda:") and name[5:].isdigit())


def resolve_providers(provider: str) -> list[str | tuple[str, dict[str, Any]]]:
    """"auto" -> CUDA (GPU 0) when this onnxruntime has it, else CPU; "cuda" or "cuda:N" insists on CUDA, on GPU 0 or
    N; "cpu" is CPU. (A bundle made for the CPU only turns "auto" into "cpu" before this: `BundleSessions`.)"""
    available = ort.get_available_providers()
    if provider == "auto":
        provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if not is_provider(provider):
        raise ValueError(f"provider must be 'auto', 'cpu', 'cuda' or 'cuda:N' (a GPU index), got {provider!r}")
    if "CUDAExecutionProvider" not in available:
        raise RuntimeError(
            f"provider={provider!r} asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {available}); install onnxruntime-gpu (pip install 'ortllava[gpu]')"
        )
    return [("CUDAExecutionProvider", {"device_id": int(provider.partition(":")[2] or 0)}), "CPUExecutionProvider"]


def _provider_name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def leave_weights_unpacked(options: ort.SessionOptions) -> None:
    """The CPU kernels use the weights as the graph stores them (memory-mapped where they are in a data file)
    instead of repacking them into the process at load (prompts run slower)."""
    options.add_session_config_entry("session.disable_prepacking", "1")


def cast_fp16_weights_as_read(options: ort.SessionOptions) -> None:
    """For a graph with fp16 weights on the CPU provider, which (on x86) has no fp16 MatMul and casts each such
    weight to fp32: by default those casts are folded at load, a whole fp32 copy of the model in the process.
    These settings leave them unfolded (no graph optimizations: the decoder is built fused, the vision graphs
    lose a few fusions), run them in priority-based order (onnxruntime appends the casts it inserts, so each
    runs last among the nodes ready, just before the node that reads it) and without an arena (which would keep
    the largest cast's buffer). A few weights are in fp32 at once (a layer's q/k/v at most), and every run,
    so every decode step, casts them all again (a 1B decoder: ~0.7 s more per run on 2 cores)."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False


def stop_idle_threads_spinning(options: ort.SessionOptions) -> None:
    """The session's worker threads block when they run out of work instead of spinning for it. For a graph
    whose run hands over to another session's (the vision encoder's to the projector's, the projector's to the
    decoder's prompt): each session has its own thread pool, and the workers of the one that just ran would
    spin on the cores the next one needs (2 cores, the benchmark model: the projector took 17-32 ms instead of
    9, and the prompt after it 30-50 ms longer). The decoder keeps spinning: its decode steps follow each other
    within microseconds, and blocking workers there made a step 10-30% slower."""
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")


def create_session(
    path: Path, providers: list, threads: int | None = None, prepack: bool = True, fp16_as_stored: bool = False, spin: bool = True,
) -> ort.InferenceSession:
    """`providers`: names, or (name, options) pairs as onnxruntime takes them. `prepack=False`: the CPU kernels
    do not repack the weights (`leave_weights_unpacked`). `fp16_as_stored`: the graph's fp16 weights stay fp16
    on the CPU provider, cast as they are read (`cast_fp16_weights_as_read`). `spin=False`: idle worker
    threads block (`stop_idle_threads_spinning`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # (cast_fp16_weights_as_read turns it off)
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        stop_idle_threads_spinning(options)
    if not prepack:
        leave_weights_unpacked(options)
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if fp16_as_stored and first == "CPUExecutionProvider":
        cast_fp16_weights_as_read(options)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for damaged graphs
        raise BundleError(f"onnxruntime cannot load graph {path.name}: {error}") from error
    if first == "CUDAExecutionProvider" and session.get_providers()[0] != first:
        # onnxruntime answers a CUDA provider it cannot start (its libraries missing, no such GPU) with a CPU session
        # and a logged line; running on would fail at the first device buffer, or run on the CPU under CUDA's name.
        device = providers[0][1].get("device_id", 0) if not isinstance(providers[0], str) else 0
        raise CudaDidNotStart(
            f"onnxruntime could not start its CUDA execution provider on GPU {device} for {path.name} (the session fell back "
            f"to {session.get_providers()[0]}): check that this GPU exists and that the CUDA and cuDNN libraries "
            "onnxruntime-gpu needs are installed (its log above says which); provider='cpu' runs on the CPU"
        )
    return session


class CudaDidNotStart(RuntimeError):
    """onnxruntime lists its CUDA provider but made a CPU session instead (`create_session`)."""


def _check_io(session: ort.InferenceSession, spec: GraphSpec, name: str) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != spec.inputs or outputs != spec.outputs:
        raise BundleError(
            f"graph {spec.file} ({name}) does not match the manifest: inputs {inputs} vs {spec.inputs}, "
            f"outputs {outputs} vs {spec.outputs}"
        )


_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}


def _check_shapes(sessions: dict[str, ort.InferenceSession], manifest: Manifest) -> None:
    """The graphs' dtypes and fixed dimensions against the manifest's model (a BundleError naming the first that
    differs), so a manifest that no longer describes its graphs fails at load rather than in onnxruntime's words."""
    text, graphs = manifest.text, manifest.graphs

    def io(name: str) -> dict[str, Any]:
        session = sessions[name]
        return {arg.name: arg for arg in [*session.get_inputs(), *session.get_outputs()]}

    def expect(graph: str, tensor: str, what: str, got: Any, want: Any) -> None:
        if isinstance(got, type(want)) and got != want:  # (a symbolic dimension is a name: nothing to compare)
            raise BundleError(f"graph {graph} does not match the manifest: its {tensor}'s {what} is {got}, the manifest says {want}")

    decoder, spec = io("decoder"), graphs["decoder"]
    kind = "concat" if POSITION_IDS in decoder else "gqa"  # (the fused graph works its positions out from the mask)
    if kind != (spec.kind or "concat"):
        raise BundleError(f"graph {spec.file} does not match the manifest: its inputs are a {kind} decoder's, the manifest says {spec.kind}")
    layers = sum(1 for name in decoder if name.startswith("past_key_values.") and name.endswith(".key"))
    expect(spec.file, "keys/values", "layer count", layers, text.num_layers)
    expect(spec.file, INPUTS_EMBEDS, "type", decoder[INPUTS_EMBEDS].type, _ORT_TYPES[spec.dtype])
    expect(spec.file, INPUTS_EMBEDS, "width", decoder[INPUTS_EMBEDS].shape[-1], text.hidden_size)
    expect(spec.file, LOGITS, "width", decoder[LOGITS].shape[-1], text.vocab_size)
    for layer in range(text.num_layers):
        past = decoder[past_key_name(layer)]
        expect(spec.file, past.name, "type", past.type, _ORT_TYPES[spec.kv_dtype or spec.dtype])
        expect(spec.file, past.name, "key/value heads", past.shape[1], text.num_key_value_heads)
        expect(spec.file, past.name, "head size", past.shape[3], text.head_dim)
    if KV_REORDER_GRAPH in sessions:  # (its I/O names, checked against the manifest, are the decoder's past names)
        reorder = io(KV_REORDER_GRAPH)
        file = graphs[KV_REORDER_GRAPH].file
        expect(file, "keys/values", "layer count", sum(1 for name in reorder if name.startswith("past_key_values.") and name.endswith(".key")), text.num_layers)
        expect(file, past_key_name(0), "type", reorder[past_key_name(0)].type, _ORT_TYPES[spec.kv_dtype or spec.dtype])
    if FEATURE_SPLICE_GRAPH in sessions:  # (the projector's output in, the decoder's input out)
        splice, file = io(FEATURE_SPLICE_GRAPH), graphs[FEATURE_SPLICE_GRAPH].file
        expect(file, PROJECTED_FEATURES, "type", splice[PROJECTED_FEATURES].type, _ORT_TYPES[graphs["projector"].dtype])
        expect(file, INPUTS_EMBEDS, "type", splice[INPUTS_EMBEDS].type, _ORT_TYPES[spec.dtype])
    encoder, projector = io("vision_encoder"), io("projector")
    for graph, tensors in ((graphs["vision_encoder"], encoder), (graphs["projector"], projector)):
        first = next(iter(tensors.values()))
        expect(graph.file, first.name, "type", first.type, _ORT_TYPES[graph.dtype])
    vision = manifest.vision
    expect(graphs["vision_encoder"].file, PIXEL_VALUES, "tile size", encoder[PIXEL_VALUES].shape[-1], vision.image_size)
    # Features per tile: one per patch, and the class token where "full" keeps it (the manifest sets the <image> tokens by these).
    patches = vision.patches_per_side**2 + (vision.num_additional_image_tokens if vision.select_strategy == "full" else 0)
    expect(graphs["vision_encoder"].file, IMAGE_FEATURES, "features per tile", encoder[IMAGE_FEATURES].shape[1], patches)
    expect(graphs["projector"].file, PROJECTED_FEATURES, "width", projector[PROJECTED_FEATURES].shape[-1], text.hidden_size)


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
        return self._bound(tiles, Device("cpu")).numpy()

    def on_device(self, tiles: np.ndarray) -> ort.OrtValue:
        """`[n_tiles, 3, S, S]` -> projected features `[n_tiles, n_patches, D]`, left on the device (IO binding only)."""
        assert self.device is not None, "on_device needs IO binding"
        return self._bound(np.ascontiguousarray(tiles, dtype=self.dtype), self.device)

    def _bound(self, tiles: np.ndarray, to: Device) -> ort.OrtValue:
        """Both runs with IO binding: the encoder's output stays on the device and feeds the projector directly; the
        projector's goes `to` the host or stays."""
        binding = self.encoder.io_binding()
        binding.bind_cpu_input(PIXEL_VALUES, tiles)
        binding.bind_output(IMAGE_FEATURES, self.device.type, self.device.id)
        self.encoder.run_with_iobinding(binding)
        features = binding.get_outputs()[0]
        binding = self.projector.io_binding()
        binding.bind_ortvalue_input(IMAGE_FEATURES, features)
        binding.bind_output(PROJECTED_FEATURES, to.type, to.id)
        self.projector.run_with_iobinding(binding)
        return binding.get_outputs()[0]


class FeatureSplice:
    """The bundle's `feature_splice` graph on the device: projected features `[n_tiles, n_patches, D]` (on the
    device), `host_rows [1 + n_text, D]` and `splice_index [B, T]` -> the prompt's embeddings `[B, T, D]`, on the
    device, for the decoder's prompt run (features.splice_index says which row each is)."""

    def __init__(self, session: ort.InferenceSession, device: Device):
        self.session = session
        self.device = device

    def __call__(self, projected: ort.OrtValue, host_rows: np.ndarray, index: np.ndarray) -> ort.OrtValue:
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(PROJECTED_FEATURES, projected)
        binding.bind_cpu_input(SPLICE_HOST_ROWS, host_rows)
        binding.bind_cpu_input(SPLICE_INDEX, index)
        binding.bind_output(INPUTS_EMBEDS, self.device.type, self.device.id)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]


def cuda_refusal(decoder: GraphSpec) -> str | None:
    """Why a bundle's decoder cannot run on the CUDA provider, and what to do (None: it can)."""
    reasons = not_for_cuda(decoder)
    if not reasons:
        return None
    return (
        f"this bundle is made for the CPU: {'; '.join(reasons)}. Load it with provider='cpu', or export for CUDA "
        "(--precision fp16, or int4 --target cuda)"
    )


def not_for_cuda(decoder: GraphSpec) -> list[str]:
    """What in a bundle's decoder the CUDA provider cannot run (or has not been verified to run)."""
    reasons = []
    if decoder.kind == "gqa" and decoder.dtype == "float32":
        # onnxruntime's CUDA GroupQueryAttention is fp16/bf16 only; the fp32 graph gives wrong tokens there.
        weights = " (its weights are 4-bit, its activations fp32)" if decoder.quantization else ""
        reasons.append(f"its fused decoder computes in fp32{weights}, which the CUDA provider's attention cannot")
    if decoder.kv_dtype == "int8":
        # Built and checked on the CPU provider only; CUDA's int8 cache path has not been run against transformers.
        reasons.append("its key/value cache is int8, verified on the CPU provider only")
    return reasons


def _whole_number(value: Any, least: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= least


# The key/value buffer length CUDA graphs use unless `max_length` says otherwise (longer contexts then need it).
CUDA_GRAPH_DEFAULT_LENGTH = 8192


class BundleSessions:
    """The graphs of a bundle, loaded for one provider: vision encoder, projector and decoder (and, where the
    keys/values live on a device, beam search's row gather)."""

    def __init__(
        self, bundle: Path, manifest: Manifest, provider: str = "auto", io_binding: bool | None = None,
        threads: int | None = None, max_length: int | None = None, cuda_graph: bool = False, prepack: bool = True,
    ):
        if max_length is not None and not _whole_number(max_length, least=1):
            raise ValueError(f"max_length must be a positive number of positions, got {max_length!r}")
        if threads is not None and not _whole_number(threads, least=0):
            raise ValueError(f"threads must be a number of threads (0 or None: onnxruntime's default), got {threads!r}")
        for name, value in (("prepack", prepack), ("cuda_graph", cuda_graph), ("io_binding", io_binding)):
            if not isinstance(value, bool) and not (name == "io_binding" and value is None):
                raise TypeError(f"{name} must be True or False{' (or None: the default)' if name == 'io_binding' else ''}, got {value!r}")
        refusal = cuda_refusal(manifest.graphs["decoder"])
        if provider == "auto" and refusal:  # a CPU bundle runs on the CPU, also where onnxruntime has CUDA
            provider = "cpu"
            if "CUDAExecutionProvider" in ort.get_available_providers():
                warn(f"provider 'auto' runs this bundle on the CPU: {refusal}")
        try:
            self._load(bundle, manifest, resolve_providers(provider), io_binding, threads, max_length, cuda_graph, prepack, refusal)
        except CudaDidNotStart as error:
            if provider != "auto":
                raise
            warn(f"provider 'auto' runs this bundle on the CPU: {error}")
            self._load(bundle, manifest, ["CPUExecutionProvider"], io_binding, threads, max_length, cuda_graph, prepack, refusal)

    def _load(
        self, bundle: Path, manifest: Manifest, providers: list, io_binding: bool | None, threads: int | None,
        max_length: int | None, cuda_graph: bool, prepack: bool, refusal: str | None,
    ) -> None:
        self.providers = providers
        on_cuda = _provider_name(self.providers[0]) == "CUDAExecutionProvider"
        fused = manifest.graphs["decoder"].kind == "gqa"
        if io_binding is None:
            io_binding = on_cuda or fused
        if on_cuda and refusal:
            raise BundleError(refusal)
        if not on_cuda and manifest.graphs["decoder"].dtype == "float16":
            warn(
                "this bundle's decoder has fp16 activations, made for CUDA; on the CPU it runs several times slower than "
                "a CPU bundle (export with --precision fp32, or --precision int4 --target cpu)",
            )
        if fused and not io_binding:
            raise ValueError("a 'gqa' decoder shares its key/value buffers through IO binding; io_binding=False is not possible")
        device = (Device("cuda", self.providers[0][1]["device_id"]) if on_cuda else Device("cpu")) if io_binding else None
        self.device = device
        sessions = {}

        def fp16_as_stored(spec: GraphSpec) -> bool:  # prepack=False keeps an fp16 graph's weights fp16 on the CPU
            return not prepack and spec.dtype == "float16"

        for name in ("vision_encoder", "projector"):  # each runs once per image and hands over to the next: no spinning
            spec = manifest.graphs[name]
            sessions[name] = create_session(bundle / spec.file, self.providers, threads, prepack, fp16_as_stored(spec), spin=False)
        # CUDA graphs replay the decode step; they need static shapes (a fixed buffer length) and a fused decoder.
        self.cuda_graph = bool(cuda_graph and on_cuda and fused)
        if cuda_graph and not self.cuda_graph:
            warn("cuda_graph needs the CUDA provider and a 'gqa' decoder; running without CUDA graphs")
        # MatMulNBits (4-bit weights) computes only from its repacked weights: without them it is ~30x slower.
        # Its float weights (an fp16 lm_head) still stay fp16 with prepack=False.
        spec = manifest.graphs["decoder"]
        sessions["decoder"] = self._decoder_session(bundle / spec.file, threads, prepack or bool(spec.quantization), fp16_as_stored(spec))
        # Beam search's row gather, where the keys/values live on a device (on the host numpy gathers them).
        if on_cuda and device is not None and KV_REORDER_GRAPH in manifest.graphs:
            sessions[KV_REORDER_GRAPH] = create_session(bundle / manifest.graphs[KV_REORDER_GRAPH].file, self.providers, threads, spin=False)
        # The prompt's embeddings gathered on the device (a fused decoder, whose prompt run takes them there); on the
        # host numpy packs and splices them.
        if on_cuda and device is not None and fused and FEATURE_SPLICE_GRAPH in manifest.graphs:
            sessions[FEATURE_SPLICE_GRAPH] = create_session(bundle / manifest.graphs[FEATURE_SPLICE_GRAPH].file, self.providers, threads, spin=False)
        for name, session in sessions.items():
            _check_io(session, manifest.graphs[name], name)
        _check_shapes(sessions, manifest)
        vision_dtype = NUMPY_DTYPES[manifest.graphs["vision_encoder"].dtype]
        self.vision = VisionPath(sessions["vision_encoder"], sessions["projector"], device, vision_dtype)
        self.splice = FeatureSplice(sessions[FEATURE_SPLICE_GRAPH], device) if FEATURE_SPLICE_GRAPH in sessions else None
        if max_length is not None and manifest.graphs["decoder"].kind != "gqa":
            warn(f"max_length={max_length} sizes a gqa decoder's key/value buffers; this bundle's decoder is concat (its cache grows as it needs): ignored")
        if self.cuda_graph and not max_length:  # graphs replay fixed shapes: one buffer length for every generation
            max_length = min(CUDA_GRAPH_DEFAULT_LENGTH, served_positions(manifest))
        self.decoder = make_decoder(sessions["decoder"], manifest, device, max_length, self.cuda_graph, sessions.get(KV_REORDER_GRAPH))

    def _decoder_session(self, path: Path, threads: int | None, prepack: bool, fp16_as_stored: bool) -> ort.InferenceSession:
        if self.cuda_graph:
            try:
                cuda = ("CUDAExecutionProvider", {**self.providers[0][1], "enable_cuda_graph": "1"})
                return create_session(path, [cuda, "CPUExecutionProvider"], threads, prepack)
            except BundleError as error:  # e.g. a node the CUDA provider does not take: graphs cannot be captured
                warn(f"CUDA graphs unavailable for this decoder ({error}); running without them")
                self.cuda_graph = False
        return create_session(path, self.providers, threads, prepack, fp16_as_stored)

    @property
    def provider(self) -> str:
        """The execution provider the graphs run on first ("CUDAExecutionProvider" or "CPUExecutionProvider")."""
        return _provider_name(self.providers[0])
