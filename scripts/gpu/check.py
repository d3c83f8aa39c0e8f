"""The GPU check, as one script: CUDA parity on tiny models, then `ortllava bench` on a Mistral-7B-shaped model.

Run on the GPU machine by scripts/gpu/run.sh (after onnxruntime-gpu is installed); `--device cpu --layers 1`
runs the same steps small on the CPU, to test this script. Writes JSON results and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from pathlib import Path

import torch  # first: onnxruntime-gpu loads the CUDA libraries that torch brings

import numpy as np
import onnxruntime as ort
from ortllava_export.photos import photo


CHATS = {
    # One image: ~2.2k tokens, past the tiny Mistral's 1024-token sliding window.
    "one image": [[{"role": "user", "content": [{"type": "image", "image": photo(640, 480, 1)}, {"type": "text", "text": "What is shown in this image?"}]}]],
    "batch of two": [
        [{"role": "user", "content": [{"type": "image", "image": photo(300, 900, 2)}, {"type": "text", "text": "Describe."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "A question without any image at all, please?"}]}],
    ],
}


def parity(device: str, work: Path) -> dict:
    """ortllava on `device` against transformers on the same device (same dtype), tiny random models: greedy answers,
    then beam search's."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    import ortllava
    from ortllava_export.cli import export_bundle
    from ortllava_export.tiny import TinySpec, build_checkpoint

    provider = "cuda" if device == "cuda" else "cpu"
    results = {}
    for family in ("mistral",):  # its 1024-token sliding window is the riskiest kernel option
        checkpoint = build_checkpoint(work / f"{family}-checkpoint", TinySpec(family=family))
        processor = AutoProcessor.from_pretrained(checkpoint)
        processor.tokenizer.padding_side = "left"
        for decoder, precision in (("gqa", "fp16"), ("gqa", "fp32"), ("concat", "fp32")):
            if device == "cuda" and decoder == "gqa" and precision == "fp32":
                continue  # refused on CUDA by design (ortllava.sessions.cuda_refusal: its GroupQueryAttention is fp16)
            name = f"{family}/{decoder}/{precision}"
            try:
                bundle = export_bundle(str(checkpoint), work / f"{family}-{decoder}-{precision}", precision=precision, decoder=decoder, validate=False)
                dtype = torch.float16 if precision == "fp16" else torch.float32
                model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
                pipe = ortllava.load(bundle, provider=provider)
                for case, chats in CHATS.items():
                    inputs = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
                    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
                    # Greedy, then beam search (each step reorders the cache's rows on the device: `reorder_rows`).
                    for search, options in (("", {}), (" beams", {"num_beams": 3, "num_return_sequences": 2})):
                        with torch.no_grad():
                            out = model.generate(**inputs, do_sample=False, max_new_tokens=16, min_new_tokens=16, **options)
                        want = [row.tolist() for row in out[:, inputs["input_ids"].shape[1] :].cpu()]
                        answers = pipe.generate(messages=chats, max_new_tokens=16, min_new_tokens=16, **options)
                        got = [r.token_ids for r in ([r for group in answers for r in group] if options else answers)]  # (a list per chat)
                        agreement = float(np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(got, want)]))
                        results[f"{name}: {case}{search}"] = {"identical": got == want, "agreement": agreement}
                        print(f"parity {name} {case}{search}: identical={got == want} agreement={agreement:.2f}", flush=True)
                results[f"{name}: device paths"] = device_paths(pipe, bundle)
                print(f"parity {name} device paths: {results[f'{name}: device paths']}", flush=True)
            except Exception as error:  # noqa: BLE001 - report and go on with the next check
                results[name] = {"error": repr(error)}
                traceback.print_exc()
    return results


def device_paths(pipe, bundle: Path) -> dict:
    """The runtime's own paths that keep keys/values on the device, each against ortllava's one-shot generate (which
    the parity above holds to transformers'): a chat's second turn reuses the first turn's cache (truncate, reserve,
    extend); `num_return_sequences` copies a prefilled cache's rows (`repeat_rows`), here sampled with top_k=1, so
    each copy must give the greedy answer; beam search (its cache's rows gathered on the device each step) under CUDA
    graphs, where the gathered rows are copied back into the captured step's buffers, as without them. Each check
    runs on its own (one that raises is recorded as its error); the CUDA-graph load records what it did: the warnings
    it gave, whether graphs were on, and how many captured steps failed."""
    import ortllava

    chat = CHATS["one image"][0]
    options = dict(max_new_tokens=12, min_new_tokens=12)
    results: dict = {}

    def check(name: str, run) -> None:
        try:
            results[name] = run()
        except Exception as error:  # noqa: BLE001 - recorded; the next check runs
            results[name] = {"error": repr(error)}
            traceback.print_exc()

    try:
        greedy = pipe.generate(messages=chat, **options)
    except Exception as error:  # noqa: BLE001 - every check below compares with it
        traceback.print_exc()
        return {"greedy answer": {"error": repr(error)}}

    def chat_turns() -> bool:  # (its partial results recorded as they come)
        session = pipe.chat(**options)
        first = session.send(chat[0]["content"][1]["text"], images=[chat[0]["content"][0]["image"]])
        results["first turn as generate"] = first.token_ids == greedy.token_ids
        second = session.send("And the colours?")
        results["chat prefilled only the new tokens"] = second.metrics.prefilled_tokens < second.metrics.prompt_tokens
        fresh = pipe.generate(messages=session.messages[:-1], **options)  # the two turns' messages, without the last answer
        return second.token_ids == fresh.token_ids

    check("chat second turn as a fresh generate", chat_turns)
    check("copied caches give the greedy answer", lambda: [
        r.token_ids for r in pipe.generate(messages=chat, do_sample=True, top_k=1, num_return_sequences=2, **options)
    ] == [greedy.token_ids] * 2)
    # (beam search's rows are gathered on the device there; on the CPU, by numpy)
    check("kv_reorder loaded where the cache is on a device", lambda: (pipe.sessions.decoder.reorder is not None) == (pipe.sessions.provider == "CUDAExecutionProvider"))
    beams = dict(num_beams=3, num_return_sequences=3, **options)

    def beams_under_graphs() -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # (on the CPU, or with a concat decoder, graphs are off: warned of, recorded)
            graphs = ortllava.load(bundle, provider=pipe.sessions.provider.removesuffix("ExecutionProvider").lower(), cuda_graph=True, max_length=4096)
            under_graphs = [r.token_ids for r in graphs.generate(messages=chat, **beams)]
            # Then greedy twice: the second reuses the first's one-row cache and its captured graph (2 graph ids in all).
            again = [graphs.generate(messages=chat, **options).token_ids for _ in range(2)]
        results["greedy under CUDA graphs, twice after beam search"] = again == [greedy.token_ids] * 2
        results["graph ids made (2: one per batch size)"] = getattr(graphs.sessions.decoder, "_graph_ids", None)  # (a concat decoder has none)
        results["CUDA graphs on at load"] = graphs.sessions.cuda_graph
        results["captured steps that failed"] = graphs.sessions.decoder.graph_failures
        results["warnings under CUDA graphs"] = sorted({str(w.message)[:300] for w in caught})
        return under_graphs == [r.token_ids for r in pipe.generate(messages=chat, **beams)]

    check("beam search under CUDA graphs as without", beams_under_graphs)
    return results


def vision_profile(bundle: Path, device: str) -> dict:
    """Where the vision encoder's time goes on `device`: per op type and provider, 5 tiles, from onnxruntime's profiler."""
    import collections
    import tempfile

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortllava-gpu"))
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: parity,plain,profile,graph")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    from ortllava_export.bench import bench

    summary = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "torch": torch.__version__}
    if args.device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(0)
    print(summary, flush=True)
    start = time.perf_counter()
    if "parity" not in skip:
        summary["parity"] = parity(args.device, args.work)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    provider = "cuda" if args.device == "cuda" else "cpu"
    # fp16 and int4 from one checkpoint, alternating in the same runs (their ratio is the int4 target); then
    # both again with CUDA graphs, reusing the bundles.
    bundles = args.work / "b7"
    runs = [("plain", dict(cuda_graph=False)), ("graph", dict(cuda_graph=True))]
    for name, options in runs:
        if name in skip:
            continue
        try:
            report = bench(
                "mistral-7b", provider=provider, precision=["fp16", "int4"], layers=args.layers, repeats=3, max_length=4096,
                output=args.out / f"bench_{name}.json", bundle=bundles, **options,
            )
            summary[f"bench_{name}"] = {"transformers": report["transformers"], "bandwidth_gb_s": report["bandwidth_gb_s"]}
            for precision, result in report["precisions"].items():
                summary[f"bench_{name}"][precision] = {
                    k: result[k] for k in (
                        "ortllava", "ratios", "fraction_of_floor", "decode_floor_ms", "token_agreement", "same_prefix_tokens", "decoder_file_bytes",
                        "decoder_providers", "cuda_graph_used",
                    )
                }
        except Exception as error:  # noqa: BLE001
            summary[f"bench_{name}"] = {"error": repr(error)}
            traceback.print_exc()
        if name == "plain" and "profile" not in skip:
            try:
                summary["vision_profile"] = vision_profile(bundles / "fp16", args.device)
            except Exception as error:  # noqa: BLE001
                summary["vision_profile"] = {"error": repr(error)}
                traceback.print_exc()
        print(f"[{time.perf_counter() - start:.0f} s] {name} done", flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))  # kept if a later step runs out of time
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
