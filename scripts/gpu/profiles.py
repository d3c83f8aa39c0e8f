"""The GPU check's profiles (scripts/gpu/check.py): where the vision encoder's and a generation's GPU time goes, and
the prefill's compute floor."""

from __future__ import annotations

import collections
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch  # first: onnxruntime-gpu loads the CUDA libraries that torch brings

import numpy as np
import onnxruntime as ort
from ortllava_export.photos import photo


def vision_profile(bundle: Path, device: str) -> dict:
    """Where the vision encoder's time goes on `device`: per op type and provider, 5 tiles, from onnxruntime's profiler."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "vision")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(bundle / "vision_encoder.onnx"), options, providers=providers)
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    tiles = np.random.default_rng(0).standard_normal((5, 3, 336, 336)).astype(dtype)
    for _ in range(3):
        session.run(None, {"pixel_values": tiles})
    start = time.perf_counter()
    for _ in range(5):
        session.run(None, {"pixel_values": tiles})
    per_run_ms = (time.perf_counter() - start) / 5 * 1000
    events = json.loads(Path(session.end_profiling()).read_text())
    totals = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            args = event.get("args", {})
            totals[f"{args.get('op_name')}@{args.get('provider')}"] += event["dur"] / 8 / 1000  # ms per run
    top = dict(totals.most_common(12))
    print(f"vision encoder, 5 tiles: {per_run_ms:.1f} ms per run; top ops (ms/run): {top}", flush=True)
    return {"per_run_ms": per_run_ms, "top_ops_ms": top}


def kernel_trace(run, device: str, work: Path, name: str) -> dict:
    """GPU kernels (including onnxruntime's: CUPTI sees every kernel in the process) while `run()` runs, from torch's
    profiler: per kernel name, the time and count; the GPU's busy time (kernels' union) and the wall time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run()
        wall_ms = (time.perf_counter() - start) * 1000
    trace = work / f"trace-{name}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    with gzip.open(work / f"trace-{name}.json.gz", "wt") as kept:
        json.dump(events, kept)
    trace.unlink()  # (the compressed copy is the one kept)
    per_name: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    spans = []
    for event in events:
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event:
            label = f"{event['cat']}: {event['name'][:140]}"
            per_name[label] += event["dur"] / 1000
            counts[label] += 1
            spans.append((event["ts"], event["ts"] + event["dur"]))
    busy, end = 0.0, float("-inf")
    for lo, hi in sorted(spans):  # the union of the kernels' intervals
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    return {
        "wall_ms": wall_ms, "gpu_busy_ms": busy / 1000, "kernels": len(spans),
        "top_ms": {k: [round(v, 3), counts[k]] for k, v in per_name.most_common(25)},
    }


def kernel_profile(bundle: Path, device: str, work: Path, tag: str, new_tokens: int = 33, **load) -> dict:
    """Where a generate's GPU time goes for the benchmark's prompt (one 600x400 photo): the prompt alone (preprocessing,
    vision, prefill: `max_new_tokens=1`), and `new_tokens` tokens; their difference per kernel name over
    `new_tokens - 1` is a decode step. `gpu_busy_ms` against `wall_ms` shows the time the GPU sat idle (launches,
    host work). `load`: `ortllava.load`'s options; the traces go to `work/trace-{tag}-*.json.gz`."""
    import ortllava

    messages = [{"role": "user", "content": [{"type": "image", "image": photo(600, 400)}, {"type": "text", "text": "What is shown in this image?"}]}]
    pipe = ortllava.load(bundle, provider="cuda" if device == "cuda" else "cpu", max_length=4096, **load)
    pipe.generate(messages=messages, max_new_tokens=4, min_new_tokens=4)  # warm-up
    results: dict = {}
    for label, tokens in (("prompt", 1), ("generate", new_tokens)):
        answer = {}
        results[label] = kernel_trace(lambda: answer.update(r=pipe.generate(messages=messages, max_new_tokens=tokens, min_new_tokens=tokens)), device, work, f"{tag}-{label}")
        results[label]["metrics"] = answer["r"].metrics.as_dict()
    steps = new_tokens - 1
    prompt, whole = results["prompt"], results["generate"]
    results["decode_step"] = {
        "gpu_busy_ms": (whole["gpu_busy_ms"] - prompt["gpu_busy_ms"]) / steps,
        "wall_ms": whole["metrics"]["decode_ms_per_token"],  # (the runs' walls differ by more than the prompt's noise)
        "kernels": (whole["kernels"] - prompt["kernels"]) / steps,
    }
    print(f"kernel profile {tag}: prompt {prompt['wall_ms']:.1f} ms wall, {prompt['gpu_busy_ms']:.1f} ms GPU busy; decode step {results['decode_step']}", flush=True)
    return results


def prefill_floor(device: str, config, prompt_tokens: int, tiles: int = 5, layers: int | None = None) -> dict:
    """The time-to-first-token floor that compute sets on this GPU: torch's own fp16 GEMMs (cuBLAS) and causal
    flash attention for the decoder's prefill of `prompt_tokens`, and the vision tower's over `tiles` 336 px tiles
    (577 positions each), each timed alone (best of 10) and summed over the layers. Preprocessing and the
    projector are not in it."""
    import torch.nn.functional as F

    dtype = torch.float16 if device == "cuda" else torch.float32
    layers = layers or config.text_layers

    def best_ms(fn) -> float:
        fn()
        times = []
        for _ in range(10):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
        return min(times)

    def gemm(m: int, k: int, n: int) -> tuple[float, float]:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        ms = best_ms(lambda: a @ b)
        return ms, 2 * m * k * n / ms / 1e9  # (ms, TFLOP/s)

    def attention(batch: int, heads: int, positions: int, head_dim: int, causal: bool) -> float:
        q = torch.randn(batch, heads, positions, head_dim, device=device, dtype=dtype)
        return best_ms(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=causal))

    head_dim = config.text_hidden // config.heads
    m, h = prompt_tokens, config.text_hidden
    text = {
        "qkv": gemm(m, h, (config.heads + 2 * config.kv_heads) * head_dim),
        "o": gemm(m, h, h),
        "gate_up": gemm(m, h, 2 * config.ffn),
        "down": gemm(m, config.ffn, h),
    }
    text_attention = attention(1, config.heads, m, head_dim, True)
    v, vm = config.vision_hidden, tiles * 577
    vision = {"qkv": gemm(vm, v, 3 * v), "o": gemm(vm, v, v), "fc1": gemm(vm, v, config.vision_ffn), "fc2": gemm(vm, config.vision_ffn, v)}
    vision_attention = attention(tiles, config.vision_heads, 577, v // config.vision_heads, False)
    decoder_ms = layers * (sum(ms for ms, _ in text.values()) + text_attention)
    vision_ms = config.vision_layers * (sum(ms for ms, _ in vision.values()) + vision_attention)
    result = {
        "prompt_tokens": prompt_tokens, "layers": layers, "decoder_prefill_ms": decoder_ms, "vision_tower_ms": vision_ms,
        "decoder_gemm_ms_tflops": text, "decoder_attention_ms": text_attention, "vision_gemm_ms_tflops": vision, "vision_attention_ms": vision_attention,
    }
    print(f"prefill floor (torch fp16 GEMMs + flash attention): decoder {decoder_ms:.1f} ms, vision tower {vision_ms:.1f} ms; {text}", flush=True)
    return result
