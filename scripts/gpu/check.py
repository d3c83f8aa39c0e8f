"""The GPU check, as one script: CUDA parity on tiny models, then `ortllava bench` on a Mistral-7B-shaped model,
with profiles of where the time goes (profiles.py).

Run on the GPU machine by scripts/gpu/run.sh (after onnxruntime-gpu is installed); `--device cpu --model tiny
--layers 2` runs the same steps small on the CPU, to test this script. Writes JSON results and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import time
import traceback
import warnings
from pathlib import Path

import torch  # first: onnxruntime-gpu loads the CUDA libraries that torch brings

import numpy as np
import onnxruntime as ort
from ortllava_export.photos import photo
from ortllava_export.graphs.quantize import Int4Options
from profiles import kernel_profile, prefill_floor, vision_profile


CHATS = {
    # One image: ~2.2k tokens, past the tiny Mistral's 1024-token sliding window.
    "one image": [[{"role": "user", "content": [{"type": "image", "image": photo(640, 480, 1)}, {"type": "text", "text": "What is shown in this image?"}]}]],
    "batch of two": [
        [{"role": "user", "content": [{"type": "image", "image": photo(300, 900, 2)}, {"type": "text", "text": "Describe."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "A question without any image at all, please?"}]}],
    ],
}


PARITY_RUNS = [("gqa", "fp16"), ("gqa", "fp32"), ("concat", "fp32")]
# GroupQueryAttention's decode kernels on CUDA, by onnxruntime 1.31's switches (read when a session is made). Without
# XQA, an SM90 GPU took cuDNN's attention (2026-11-28, H200); the last pins onnxruntime's own flash decoding.
DECODE_KERNELS = {
    "XQA, onnxruntime's default": {},
    "cuDNN": {"ORT_ENABLE_XQA": "0"},
    "flash decoding": {"ORT_ENABLE_XQA": "0", "ORT_ENABLE_CUDNN_FLASH_ATTENTION": "0"},
}

# MatMulNBits' (4-bit weights) kernels on CUDA: onnxruntime 1.31's default for one row, `MatMulFloat4BitsKernelM1`, read
# its weights at ~52% of the H200's bandwidth (2026-11-28); ORT_FPA_INTB_GEMM=1 turns on its fpA_intB path (CUTLASS GEMM
# and a GEMV for decoding) for fp16 activations and weights without zero points, as ours are. Read when a session is made.
INT4_KERNELS = {"fpA_intB": {"ORT_FPA_INTB_GEMM": "1"}}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """`values` set in os.environ inside the block, the earlier values (or their absence) back after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# A parting where transformers' own scores for the two tokens differ by less than this share of the scores' spread
# (standard deviation) is a near-tie: fp16 rounding in either implementation may decide it (on the CPU provider,
# seed 2 of the Yi-style case parts at 1.0% of the spread; kernels' faults move logits by far more).
NEAR_TIE = 0.02


def divergence(got: list[list[int]], want: list[list[int]], scores) -> list[dict]:
    """For each row where ortllava's greedy tokens leave transformers': the step, both tokens, the margin between
    those two tokens in transformers' own scores at that step, and whether that is a near-tie (`NEAR_TIE`)."""
    rows = []
    for row, (a, b) in enumerate(zip(got, want)):
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None:
            continue
        step_scores = scores[step][row].float()
        margin = float(step_scores[b[step]] - step_scores[a[step]])
        spread = float(step_scores[torch.isfinite(step_scores)].std())
        rows.append({"row": row, "step": step, "ours": a[step], "theirs": b[step], "margin": margin, "score_std": spread, "near_tie": margin < NEAR_TIE * spread})
    return rows


def parity(device: str, work: Path, families: list[str]) -> dict:
    """ortllava on `device` against transformers on the same device (same dtype), tiny random models: greedy answers,
    then beam search's."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    import ortllava
    from ortllava_export.cli import export_bundle
    from ortllava_export.tiny import TinySpec, build_checkpoint

    provider = "cuda" if device == "cuda" else "cpu"
    results = {}
    exported: set[Path] = set()
    # mistral: its 1024-token sliding window is the riskiest kernel option. yi-h128: no window and 128-wide heads (2
    # query heads a KV head), the decode kernels' case that Mistral-7B-shaped models take, under each decode kernel.
    # At this width fp16 greedy answers meet near-ties: transformers' own top-1/top-2 margins (fp32, CPU) fall to
    # 0.008 here (a logit spread of 4.5), and to 0.003-0.04 for seeds 1-6; where tokens part, `divergence` says
    # whether at such a tie.
    specs = {
        "mistral": (TinySpec(family="mistral"), PARITY_RUNS, {"": {}}),
        "yi-h128": (TinySpec(family="yi", hidden_size=512), [("gqa", "fp16")], DECODE_KERNELS),
    }
    for family, (spec, runs, kernels) in ((name, specs[name]) for name in families):
        checkpoint = build_checkpoint(work / f"{family}-checkpoint", spec)
        processor = AutoProcessor.from_pretrained(checkpoint)
        processor.tokenizer.padding_side = "left"
        for (decoder, precision), (kernel, env) in itertools.product(runs, kernels.items()):
            if device == "cuda" and decoder == "gqa" and precision == "fp32":
                continue  # refused on CUDA by design (ortllava.bundle.sessions.cuda_refusal: its GroupQueryAttention is fp16)
            name = f"{family}/{decoder}/{precision}" + (f" ({kernel})" if kernel else "")
            try:
                bundle = work / f"{family}-{decoder}-{precision}"
                if bundle not in exported:  # (once for all the decode kernels)
                    exported.add(export_bundle(str(checkpoint), bundle, precision=precision, decoder=decoder, validate=False))
                dtype = torch.float16 if precision == "fp16" else torch.float32
                model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
                with environment(env):  # (onnxruntime reads its kernel switches when a session is made)
                    pipe = ortllava.load(bundle, provider=provider)
                for case, chats in CHATS.items():
                    inputs = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
                    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
                    # Greedy, then beam search (each step reorders the cache's rows on the device: `reorder_rows`), then
                    # classifier-free guidance (a second cache of the decoder, on the device too).
                    for search, options in (("", {}), (" beams", {"num_beams": 3, "num_return_sequences": 2}), (" guidance", {"guidance_scale": 2.0})):
                        with torch.no_grad():
                            out = model.generate(
                                **inputs, do_sample=False, max_new_tokens=16, min_new_tokens=16, output_scores=True, return_dict_in_generate=True, **options,
                            )
                        want = [row.tolist() for row in out.sequences[:, inputs["input_ids"].shape[1] :].cpu()]
                        answers = pipe.generate(messages=chats, max_new_tokens=16, min_new_tokens=16, **options)
                        got = [r.token_ids for r in ([r for group in answers for r in group] if "num_beams" in options else answers)]  # (a list per chat)
                        agreement = float(np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(got, want)]))
                        results[f"{name}: {case}{search}"] = {"identical": got == want, "agreement": agreement}
                        if "num_beams" not in options and got != want:  # a near-tie in transformers' own scores, or a kernel's fault?
                            results[f"{name}: {case}{search}"]["divergence"] = divergence(got, want, out.scores)
                        print(f"parity {name} {case}{search}: {results[f'{name}: {case}{search}']}", flush=True)
                if family == "mistral":
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
    # (the prompt's embeddings are gathered on the device for a gqa decoder there; on the CPU, numpy splices them)
    on_device = pipe.sessions.provider == "CUDAExecutionProvider" and pipe.manifest.graphs["decoder"].kind == "gqa"
    check("feature_splice loaded where a gqa decoder is on a device", lambda: (pipe.sessions.splice is not None) == on_device)

    def spliced_on_the_host() -> bool:
        splice, pipe.sessions.splice = pipe.sessions.splice, None
        try:
            return pipe.generate(messages=chat, **options).token_ids == greedy.token_ids
        finally:
            pipe.sessions.splice = splice

    check("embeddings spliced on the host give the device's answer", spliced_on_the_host)
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
        # Guidance under graphs, twice: its one-row cache is a second one beside the answer's (a third graph id), kept
        # and reused by the second call (no fourth).
        guided = dict(guidance_scale=2.0, **options)
        want = pipe.generate(messages=chat, **guided).token_ids
        results["guidance under CUDA graphs as without, twice"] = [graphs.generate(messages=chat, **guided).token_ids for _ in range(2)] == [want] * 2
        results["graph ids after guidance (3)"] = getattr(graphs.sessions.decoder, "_graph_ids", None)
        return under_graphs == [r.token_ids for r in pipe.generate(messages=chat, **beams)]

    check("beam search under CUDA graphs as without", beams_under_graphs)
    return results


def kernel_profiles(args, summary: dict, bundles: Path) -> None:
    """Where the GPU's time goes, kernel by kernel (`kernel_profile`), for each of `--kernel-runs`; into `summary`."""
    for label in args.kernel_runs.split(","):
        precision, *words = label.split()
        options = {"cuda_graph": True} if "graph" in words else {}
        env = DECODE_KERNELS["cuDNN"] if "cudnn" in words else DECODE_KERNELS["flash decoding"] if "flash" in words else {}
        env = {**env, **(INT4_KERNELS["fpA_intB"] if "fpa" in words else {})}
        tag = "-".join([precision, *words])
        try:
            with environment(env):
                summary.setdefault("kernel_profile", {})[label] = kernel_profile(bundles / precision, args.device, args.work, tag, **options)
        except Exception as error:  # noqa: BLE001
            summary.setdefault("kernel_profile", {})[label] = {"error": repr(error)}
            traceback.print_exc()
        for trace in args.work.glob("trace-*.json.gz"):  # (kept as they come: a run may be cut short)
            trace.replace(args.out / trace.name)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="mistral-7b", help="ortllava bench's random configuration (tiny: to test this script on the CPU)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--parity", default="mistral,yi-h128", help="the tiny models of the parity step (comma-separated)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ortllava-gpu"))
    parser.add_argument("--skip", default="", help="comma-separated steps to skip: parity,plain,graph,graph_cudnn,graph_flash,graph_fpa_intb,int4_b128,profile,floor,kernels")
    parser.add_argument("--kernel-runs", default="fp16,int4,fp16 graph,int4 graph", help="the kernel profiles, comma-separated: a bundle (fp16, int4), then 'graph' for CUDA graphs, 'cudnn' or 'flash' for that decode kernel, 'fpa' for the fpA_intB int4 kernels")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    from ortllava_export.bench.run import CONFIGS, bench

    summary = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "torch": torch.__version__}
    if args.device == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(0)
    print(summary, flush=True)
    start = time.perf_counter()
    if "parity" not in skip:
        summary["parity"] = parity(args.device, args.work, args.parity.split(","))
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    provider = "cuda" if args.device == "cuda" else "cpu"
    # fp16 and int4 from one checkpoint, alternating in the same runs (their ratio is the int4 target); the runs after
    # the first reuse the bundles. Each run: (name, bench's options, environment). "graph_cudnn" and "graph_flash"
    # decode with the other kernels of DECODE_KERNELS, "graph_fpa_intb" multiplies the 4-bit weights with INT4_KERNELS'
    # (fp16, unaffected, is the baseline in the same runs); "int4_b128": an int4 bundle with 128 input rows a scale
    # (the default is 32). All but "plain" under CUDA graphs.
    bundles = args.work / "b7"
    both = dict(precision=["fp16", "int4"], bundle=bundles)
    runs = [
        ("plain", dict(cuda_graph=False, **both), {}),
        ("graph", dict(cuda_graph=True, **both), {}),
        ("graph_cudnn", dict(cuda_graph=True, **both), DECODE_KERNELS["cuDNN"]),
        ("graph_flash", dict(cuda_graph=True, **both), DECODE_KERNELS["flash decoding"]),
        ("graph_fpa_intb", dict(cuda_graph=True, **both), INT4_KERNELS["fpA_intB"]),
        ("int4_b128", dict(cuda_graph=True, precision=["int4"], bundle=args.work / "b7-int4-b128", int4=Int4Options(block_size=128)), {}),
    ]
    for name, options, env in runs:
        if name in ("graph_fpa_intb", "int4_b128") and "kernels" not in skip:  # (the kernels before the riskier runs)
            kernel_profiles(args, summary, bundles)
            skip.add("kernels")
        if name in skip:
            continue
        try:
            with environment(env):
                report = bench(args.model, provider=provider, layers=args.layers, repeats=3, max_length=4096, output=args.out / f"bench_{name}.json", **options)
            summary[f"bench_{name}"] = {"environment": env, "transformers": report["transformers"], "bandwidth_gb_s": report["bandwidth_gb_s"]}
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
        if name in ("plain", "graph") and "profile" not in skip and "vision_profile" not in summary:
            try:
                summary["vision_profile"] = vision_profile(bundles / "fp16", args.device)
            except Exception as error:  # noqa: BLE001
                summary["vision_profile"] = {"error": repr(error)}
                traceback.print_exc()
        if name in ("plain", "graph") and "floor" not in skip and "prefill_floor" not in summary:
            try:
                prompt_tokens = json.loads((args.out / f"bench_{name}.json").read_text())["prompt_tokens"]
                summary["prefill_floor"] = prefill_floor(args.device, CONFIGS[args.model], prompt_tokens, layers=args.layers)
            except Exception as error:  # noqa: BLE001
                summary["prefill_floor"] = {"error": repr(error)}
                traceback.print_exc()
        print(f"[{time.perf_counter() - start:.0f} s] {name} done", flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))  # kept if a later step runs out of time
    if "kernels" not in skip:
        kernel_profiles(args, summary, bundles)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
