"""`ortllava bench`: ortllava against transformers on the same weights and inputs, in one process.

A run: build (or load) the checkpoint, export it in one or more precisions, then alternate transformers and
ortllava generations (each precision in turn) on one image and prompt, check that the tokens agree, and
report preprocessing, vision, time to first token, decode ms/token and tokens/s, peak memory, and the decode
floor: the bytes a decode step must read (decoder weights + keys/values at the context length) over the
memory bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..graphs.quantize import Int4Options
from ..photos import photo

if TYPE_CHECKING:
    from ..plan import ExportPlan


@dataclass(frozen=True)
class BenchConfig:
    """A random LLaVA-NeXT shape (CLIP-style tower, Mistral-style decoder)."""

    text_hidden: int
    text_layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_ffn: int
    # transformers' default for random weights. Wider ones (the tests' 0.2) make attention logits so large
    # that softmax underflows into denormal floats, which slow CPU kernels several-fold: a timing artifact
    # of random weights that real checkpoints do not have.
    initializer_range: float = 0.02


# The decode figure is (last token's arrival - first token's) / (new tokens - 1): it needs two tokens.
MIN_NEW_TOKENS = 2

CONFIGS = {
    # The speed issue's CPU model: tower 6 x 256 at 336 px; decoder 8 x 512, 8 heads, 4 KV heads, FFN 1408, 32k vocab.
    "cpu-mid": BenchConfig(512, 8, 8, 4, 1408, 32000, 256, 6, 4, 1024),
    # A smoke-test shape (seconds to build and run); not for figures.
    "tiny": BenchConfig(64, 2, 4, 2, 128, 1000, 32, 2, 2, 64, initializer_range=0.2),  # wide: exact greedy parity
    # Mistral-7B's decoder shape (layers reducible with --layers) with CLIP-L/336's tower.
    "mistral-7b": BenchConfig(4096, 32, 32, 8, 14336, 32000, 1024, 24, 16, 4096),
}


def build_checkpoint(name: str, layers: int | None = None, device: str = "cpu"):
    """A random checkpoint of `CONFIGS[name]` in memory (weights initialised on `device`, kept fp32 on the CPU)."""
    import torch
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    from ..checkpoint import Checkpoint
    from ..families import check_supported
    from ..tiny import CLIP_PINPOINTS, TinySpec, build_processor, build_tokenizer

    shape = CONFIGS[name]
    tokenizer = build_tokenizer("mistral")
    text = MistralConfig(
        hidden_size=shape.text_hidden, intermediate_size=shape.ffn, num_hidden_layers=layers or shape.text_layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.text_hidden // shape.heads,
        vocab_size=shape.vocab, max_position_embeddings=32768, sliding_window=None, initializer_range=shape.initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_ffn, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=336, patch_size=14, projection_dim=shape.vision_hidden,
    )
    config = LlavaNextConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=CLIP_PINPOINTS, image_seq_length=576,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration(config)
    model = model.float().cpu().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = build_processor(TinySpec(family="mistral"), tokenizer)
    return Checkpoint(model, processor, check_supported(model.config), f"random:{name}", None)


# ------------------------------------------------------------------------------------------------------
# Memory bandwidth and the decode floor


def cpu_bandwidth(threads: int, megabytes: int = 512) -> float:
    """Bytes/s that onnxruntime streams from memory on this CPU with `threads` threads: the better of a
    ReduceSum over a large array and a one-row MatMul over a large weight (what a decode step does)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads

    def session(node, inputs, output):
        graph = helper.make_graph([node], "read", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def best(run, nbytes: int) -> float:
        run()
        return nbytes / min(_timed(run) for _ in range(7))

    data = np.ones(megabytes * 2**20 // 4, np.float32)
    reduce = session(helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0), [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])], "y")
    columns = 4096
    weight = data.reshape(-1, columns)
    row = np.ones((1, weight.shape[0]), np.float32)
    gemv = session(
        helper.make_node("MatMul", ["a", "w"], ["y"]),
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, weight.shape[0]]), helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.shape))],
        "y",
    )
    return max(best(lambda: reduce.run(None, {"x": data}), data.nbytes), best(lambda: gemv.run(None, {"a": row, "w": weight}), weight.nbytes))


def gpu_bandwidth(gigabytes: float = 2.0) -> float:
    """Bytes/s that the GPU reads (a sum over a large fp16 tensor), measured with torch."""
    import torch

    data = torch.ones(int(gigabytes * 2**30) // 2, dtype=torch.float16, device="cuda")
    data.sum()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        data.sum()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return data.numel() * 2 / min(times)


def decoder_bytes(bundle: Path) -> int:
    """Bytes of the decoder graph's weights, the rotary tables excepted (a step reads every weight once)."""
    import onnx

    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name.startswith("rotary."):
            continue
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def kv_bytes(config, positions: int, itemsize: int) -> int:
    from ..graphs.wrappers import text_geometry

    layers, kv_heads, head_dim = text_geometry(config)
    return 2 * layers * kv_heads * head_dim * positions * itemsize


# ------------------------------------------------------------------------------------------------------
# The two contenders


@dataclass
class Timing:
    preprocess_s: float
    vision_s: float | None
    time_to_first_token_s: float
    decode_ms_per_token: float
    total_s: float
    tokens: list[int] = field(repr=False)


class _TokenClock:
    """A transformers streamer that notes when generate hands over the prompt and then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(model, processor, messages, new_tokens: int, device: str, dtype) -> Timing:
    """One `generate` call, timed as ours is: the first token's arrival and the steps after it, from the same run."""
    import torch

    start = time.perf_counter()
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    preprocess = time.perf_counter() - start
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    clock = _TokenClock()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    first = clock.times[1]  # times[0]: the prompt, handed over before the prefill
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    decode_ms = (clock.times[-1] - first) * 1000 / (new_tokens - 1) if new_tokens > 1 else 0.0
    return Timing(preprocess, None, first - start, decode_ms, end - start, tokens)


def run_ortllava(pipe, messages, new_tokens: int) -> Timing:
    result = pipe.generate(messages=messages, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    m = result.metrics
    return Timing(m.preprocess_s, m.vision_s, m.time_to_first_token_s, m.decode_ms_per_token, m.total_s, result.token_ids)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


TIMING_FIELDS = tuple(f.name for f in fields(Timing) if f.name != "tokens")  # the figures a run reports


def bundle_mismatch(path: Path, checkpoint, plan: ExportPlan) -> str | None:
    """How the bundle at `path` differs from the one `plan` would export from `checkpoint` (None: it can be
    reused): its source, layer count and width, precision, decoder kind and activations, 4-bit settings and
    key/value cache."""
    from ortllava.bundle.manifest import read_manifest

    manifest = read_manifest(path, verify=False)
    decoder = manifest.graphs["decoder"]
    text = checkpoint.model.config.text_config
    wanted = {
        "source": (manifest.provenance.get("source"), checkpoint.source),
        "precision": (manifest.precision, plan.precision),
        "decoder layers": (manifest.text.num_layers, text.num_hidden_layers),
        "hidden size": (manifest.text.hidden_size, text.hidden_size),
        "decoder kind": (decoder.kind, plan.decoder),
        "activations": (decoder.dtype, "float16" if plan.decoder_precision == "fp16" else "float32"),
        "key/value cache": ("int8" if decoder.kv_dtype == "int8" else "float", plan.kv_cache),
    }
    if plan.int4 is not None:
        for key in ("block_size", "symmetric", "quantize_lm_head", "accuracy_level"):
            wanted[key.replace("_", " ")] = (decoder.quantization.get(key), getattr(plan.int4, key))
    differences = [f"{what} {have!r}, not {want!r}" for what, (have, want) in wanted.items() if have != want]
    return "; ".join(differences) or None


def _median(timings: list[Timing]) -> dict:
    out = {f: (statistics.median(getattr(t, f) for t in timings) if getattr(timings[0], f) is not None else None) for f in TIMING_FIELDS}
    out["tokens_per_s"] = 1000.0 / out["decode_ms_per_token"] if out["decode_ms_per_token"] else 0.0
    return out


def _each_run(timings: list[Timing]) -> list[dict]:
    """Every run's figures, in the order they ran (the medians hide how far one hour's runs spread)."""
    return [{f: getattr(t, f) for f in TIMING_FIELDS} for t in timings]


# ------------------------------------------------------------------------------------------------------
# The benchmark


def bench(
    model: str, provider: str = "cpu", precision: str | Sequence[str] = "fp32", layers: int | None = None, new_tokens: int = 64,
    repeats: int = 3, threads: int | None = None, output: Path | None = None, bundle: Path | None = None,
    cuda_graph: bool = False, max_length: int | None = None, int4: Int4Options | None = None, text_only: bool = False,
    kv_cache: str = "auto",
) -> dict:
    """Runs the comparison and returns the report (also written as JSON to `output` when given).

    transformers runs in fp16 on CUDA and fp32 on the CPU. Several precisions (`["fp32", "int4"]`) are
    exported from the same weights and alternate in the same runs, so their ratios are not blurred by
    drift between separate runs; the report's top level describes the first, `precisions` each of them.
    `text_only` asks about no image: a short context, where the weights (not the keys/values) dominate a step.
    `kv_cache` ("auto", "float" or "int8") is the int4 bundles' key/value cache; the other precisions keep a float one.
    `new_tokens` is at least 2: the decode figure is the time from the first token to the last, per token.
    """
    if new_tokens < MIN_NEW_TOKENS:  # before anything is built or exported
        raise ValueError(
            f"--new-tokens must be >= {MIN_NEW_TOKENS} (the decode figure is the time from the first new token to the last), got {new_tokens}"
        )
    import torch

    from ..checkpoint import load_checkpoint

    precisions = [precision] if isinstance(precision, str) else list(precision)
    device = "cuda" if provider == "cuda" else "cpu"
    if device == "cuda":
        from ortllava.bundle.sessions import resolve_providers

        resolve_providers("cuda")  # an error saying so where onnxruntime has no CUDA provider
        if not torch.cuda.is_available():
            raise RuntimeError("provider 'cuda' runs transformers on the GPU too: this torch sees no CUDA device")
    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)

    checkpoint = build_checkpoint(model, layers, device) if model in CONFIGS else load_checkpoint(model)
    scratch = None
    if bundle is None:
        scratch = tempfile.TemporaryDirectory(prefix="ortllava-bench-")
        bundle = Path(scratch.name) / "bundle"
    try:
        return _run_bench(
            model, provider, device, precisions, checkpoint, Path(bundle), new_tokens, repeats, threads, output, cuda_graph,
            max_length, int4, text_only, kv_cache,
        )
    finally:  # the temporary bundles go whether the run ends or fails
        if scratch is not None:
            scratch.cleanup()


def _run_bench(
    model: str, provider: str, device: str, precisions: list[str], checkpoint, bundle: Path, new_tokens: int, repeats: int,
    threads: int, output: Path | None, cuda_graph: bool, max_length: int | None, int4: Int4Options | None, text_only: bool,
    kv_cache: str,
) -> dict:
    """`bench`'s exports, runs and report, with the checkpoint loaded and the bundles' folder chosen."""
    import torch

    import ortllava

    from ..cli import export_bundle
    from ..plan import plan_export

    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    # One precision: the bundle is `bundle`; several: `bundle/<precision>` each.
    bundles = {p: Path(bundle) if len(precisions) == 1 else Path(bundle) / p for p in precisions}
    for name, path in bundles.items():
        options = dict(
            precision=name, decoder="gqa", target=device, validate=(device == "cpu" and name == "fp32"), int4=int4,
            kv_cache=kv_cache if name == "int4" else "float",
        )
        if (path / "manifest.json").is_file():  # reused, if it is the bundle this run would export
            mismatch = bundle_mismatch(path, checkpoint, plan_export(**options))
            if mismatch:
                raise ValueError(f"the bundle in {path} is not this benchmark's ({mismatch}): remove it, or pass another --bundle")
        else:
            export_bundle(checkpoint, path, **options)

    question = {"type": "text", "text": "What is shown in this image?" if not text_only else "Describe a sunny day at the sea."}
    messages = [{"role": "user", "content": ([] if text_only else [{"type": "image", "image": photo(600, 400)}]) + [question]}]
    torch_dtype = torch.float16 if device == "cuda" else torch.float32
    hf_model = checkpoint.model.to(device, torch_dtype).eval()
    processor = checkpoint.processor
    processor.tokenizer.padding_side = "left"
    pipes = {
        name: ortllava.load(path, provider=provider, threads=threads if device == "cpu" else None, cuda_graph=cuda_graph, max_length=max_length)
        for name, path in bundles.items()
    }

    log(f"warming up ({provider}, {', '.join(precisions)}, {threads} threads)")
    run_transformers(hf_model, processor, messages, 4, device, torch_dtype)
    for pipe in pipes.values():
        run_ortllava(pipe, messages, 4)
    hf_runs: list[Timing] = []
    our_runs: dict[str, list[Timing]] = {name: [] for name in pipes}
    for index in range(repeats):  # alternate, so drift in clocks or caches hits every contender alike
        hf_runs.append(run_transformers(hf_model, processor, messages, new_tokens, device, torch_dtype))
        for name, pipe in pipes.items():
            our_runs[name].append(run_ortllava(pipe, messages, new_tokens))
        ours = ", ".join(f"ortllava {name} {runs[-1].total_s:.3f} s" for name, runs in our_runs.items())
        log(f"run {index + 1}/{repeats}: transformers {hf_runs[-1].total_s:.3f} s, {ours}")

    first = pipes[precisions[0]]
    prompt_tokens = first.prepare(messages=messages)[0]["input_ids"].shape[1]
    context = prompt_tokens + new_tokens // 2  # the average context of a decode step
    bandwidth = gpu_bandwidth() if device == "cuda" else cpu_bandwidth(threads)
    theirs = _median(hf_runs)
    results = {
        name: _precision_result(name, pipe, bundles[name], our_runs[name], hf_runs, theirs, checkpoint.model.config, context, bandwidth)
        for name, pipe in pipes.items()
    }
    first_decode = results[precisions[0]]["ortllava"]["decode_ms_per_token"]
    for result in results.values():  # how many times faster than the first precision each decodes
        result["ratios"]["decode_speedup_vs_first"] = first_decode / result["ortllava"]["decode_ms_per_token"]
    report = {
        "model": model, "layers": checkpoint.model.config.text_config.num_hidden_layers, "threads": threads,
        "prompt_tokens": int(prompt_tokens), "new_tokens": new_tokens, "repeats": repeats, "cuda_graph": cuda_graph,
        "text_only": text_only, "transformers": theirs, "transformers_runs": _each_run(hf_runs), "bandwidth_gb_s": bandwidth / 1e9,
        **results[precisions[0]],  # the first precision at the top level (what single-precision readers expect)
        "precisions": results,
        "peak_host_rss_mb": _peak_rss_mb(),
    }
    if device == "cuda":
        report["peak_gpu_torch_mb"] = torch.cuda.max_memory_allocated() / 2**20
        free, total = torch.cuda.mem_get_info()
        report["gpu_in_use_mb"] = (total - free) / 2**20
    print_report(report)
    if output:
        Path(output).write_text(json.dumps(report, indent=2))
    return report


def _precision_result(
    name: str, pipe, bundle: Path, ours_runs: list[Timing], hf_runs: list[Timing], theirs: dict, config, context: int, bandwidth: float,
) -> dict:
    """One precision's part of the report: its medians, agreement with transformers (`theirs`: their medians),
    decode floor and ratios."""
    ours = _median(ours_runs)
    kv_dtype = np.dtype(pipe.sessions.decoder.kv_dtype)
    weights = decoder_bytes(bundle)
    step_bytes = weights + kv_bytes(config, context, kv_dtype.itemsize)
    floor_ms = step_bytes / bandwidth * 1000
    return {
        "precision": name, "provider": pipe.provider, "kv_dtype": kv_dtype.name,
        # What ran, not what was asked: the decoder session's providers, and whether its steps replayed CUDA graphs
        # (graphs asked for and on at load, and no step's capture or replay failed).
        "decoder_providers": pipe.sessions.decoder.session.get_providers(),
        "cuda_graph_used": bool(pipe.sessions.cuda_graph and not pipe.sessions.decoder.graph_failures),
        "tokens_identical": all(a.tokens == b.tokens for a, b in zip(hf_runs, ours_runs)),
        "token_agreement": float(np.mean([np.mean(np.array(a.tokens) == np.array(b.tokens)) for a, b in zip(hf_runs, ours_runs)])),
        # Greedy paths part for good at their first different token: how far they agree says more than the share.
        "same_prefix_tokens": min(_common_prefix(a.tokens, b.tokens) for a, b in zip(hf_runs, ours_runs)),
        "ortllava": ours, "ortllava_runs": _each_run(ours_runs),
        "decoder_weight_bytes": weights, "decoder_file_bytes": sum(f.stat().st_size for f in bundle.glob("decoder.onnx*")),
        "decode_step_bytes": step_bytes, "decode_floor_ms": floor_ms,
        "fraction_of_floor": floor_ms / ours["decode_ms_per_token"] if ours["decode_ms_per_token"] else 0.0,
        "ratios": {
            "end_to_end": ours["total_s"] / theirs["total_s"],
            "time_to_first_token": ours["time_to_first_token_s"] / theirs["time_to_first_token_s"],
            "decode": ours["decode_ms_per_token"] / theirs["decode_ms_per_token"],
            "preprocess": ours["preprocess_s"] / theirs["preprocess_s"],
            "decode_vs_floor": ours["decode_ms_per_token"] / floor_ms,
        },
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def print_report(r: dict) -> None:
    """The report as a table: a column per ortllava precision, then transformers; the ratios and floors below."""
    runs = r["precisions"]
    names = list(runs)
    print(f"\n{r['model']} ({r['layers']} decoder layers), {r['provider']}, {r['threads']} threads; "
          f"{r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens, median of {r['repeats']}")
    headers = [f"ortllava {name}" + ("+kv8" if runs[name].get("kv_dtype") == "int8" else "") for name in names] + ["transformers"]
    width = max(16, *(len(h) + 2 for h in headers))
    print(f"{'':28}" + "".join(f"{h:>{width}}" for h in headers))

    def row(label: str, key: str, scale: float = 1.0) -> None:
        values = [runs[name]["ortllava"].get(key) for name in names] + [r["transformers"].get(key)]
        print(f"{label:28}" + "".join(f"{v * scale:{width}.1f}" if v is not None else f"{'-':>{width}}" for v in values))

    row("preprocessing (ms)", "preprocess_s", 1000)
    row("vision (ms)", "vision_s", 1000)
    row("time to first token (ms)", "time_to_first_token_s", 1000)
    row("decode (ms/token)", "decode_ms_per_token")
    row("decode (tokens/s)", "tokens_per_s")
    row("end to end (ms)", "total_s", 1000)
    print(f"{'decoder files (MB)':28}" + "".join(f"{runs[name]['decoder_file_bytes'] / 1e6:{width}.1f}" for name in names) + f"{'-':>{width}}")
    for name in names:
        run, ratios = runs[name], runs[name]["ratios"]
        print(f"{name}: end to end {ratios['end_to_end']:.2f}x transformers' time, time to first token {ratios['time_to_first_token']:.2f}x "
              f"transformers', decode {ratios['decode']:.2f}x transformers' ms/token, preprocessing {ratios['preprocess']:.2f}x transformers' "
              "(below 1: faster); "
              f"decode floor {run['decode_floor_ms']:.2f} ms/token ({run['decode_step_bytes'] / 2**20:.0f} MiB per step), "
              f"{run['fraction_of_floor'] * 100:.0f}% of it reached ({ratios['decode_vs_floor']:.2f}x the floor)")
    if len(names) > 1:
        print("decode speed vs " + names[0] + ": " + ", ".join(
            f"{name} {runs[name]['ratios']['decode_speedup_vs_first']:.2f}x as fast" for name in names[1:]))
    print(f"memory bandwidth {r['bandwidth_gb_s']:.1f} GB/s (measured in this run)")
    print("tokens identical to transformers: " + ", ".join(
        f"{name} {runs[name]['tokens_identical']} (the first {runs[name]['same_prefix_tokens']} of {r['new_tokens']} the same)" for name in names)
          + f"; peak host RSS {r['peak_host_rss_mb']:.0f} MiB"
          + (f"; GPU in use {r['gpu_in_use_mb']:.0f} MiB, torch peak {r['peak_gpu_torch_mb']:.0f} MiB" if "gpu_in_use_mb" in r else ""))
