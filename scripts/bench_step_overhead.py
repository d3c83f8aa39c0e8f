"""The decode loop's own host time per step: ortllava's Python between two decoder runs, with onnxruntime's run
replaced by a no-op (the logits stay as the prompt left them, so every step picks the same token).

    python scripts/bench_step_overhead.py BUNDLE [--tokens 256] [--repeats 7] [--batch 1] [--profile]

On a GPU the decoder's step is launched by the host, so this time is time the GPU waits between steps (the H200's
kernel trace counted 225-260 us of it at 32 layers: docs/measurements.md). Prints, per form of the call, the
median, fastest and slowest of `--repeats` generations in us/step: greedy; greedy with a logits processor
(`min_new_tokens`, which the benchmark sets); sampling with top-k; and a stream. `--profile` adds cProfile's
largest entries for the greedy form.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

import numpy as np

import ortllava

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


def forms(tokens: int) -> dict[str, dict]:
    """The calls timed: generate() keyword arguments (`stream` is run through Pipeline.stream)."""
    return {
        "greedy": dict(max_new_tokens=tokens),
        "greedy, min_new_tokens": dict(max_new_tokens=tokens, min_new_tokens=tokens),
        "top-k sampling": dict(max_new_tokens=tokens, do_sample=True, top_k=50, seed=0),
        "stream, greedy": dict(max_new_tokens=tokens, stream=True),
    }


def no_op_runs(pipe) -> None:
    """Every decoder run (prompt and steps) returns at once. Each new cache's logits buffer is filled once with
    logits of a realistic spread (normal, std 2, the EOS ids far below the rest so that no answer ends early), which
    every step then reads again."""
    decoder = pipe.sessions.decoder
    decoder.session.run_with_iobinding = lambda binding, options=None: None
    new_cache, rng, eos = decoder._new_cache, np.random.default_rng(0), pipe.manifest.tokens.eos_token_ids

    def filled_cache(batch: int, capacity: int):
        cache = new_cache(batch, capacity)
        cache.logits[:] = rng.normal(0.0, 2.0, cache.logits.shape)
        cache.logits[:, eos] = -30.0
        return cache

    decoder._new_cache = filled_cache


def step_us(pipe, messages, kwargs: dict) -> float:
    kwargs = dict(kwargs)
    if kwargs.pop("stream", False):
        chunks = list(pipe.stream(messages=messages, **kwargs))
        metrics = chunks[-1].metrics
    else:
        metrics = pipe.generate(messages=messages, **kwargs).metrics
    return metrics.decode_s * 1e6 / (metrics.generated_tokens - 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens a generation (default 256)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1, help="prompts a generation (the same one, repeated)")
    parser.add_argument("--profile", action="store_true", help="cProfile's largest entries for the greedy form")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens: at least 2")
    pipe = ortllava.load(args.bundle, provider="cpu", verify=False, max_length=args.tokens + 64)
    if pipe.manifest.graphs["decoder"].kind != "gqa":
        parser.error("a bundle with a 'gqa' decoder (the one whose buffers this script fills)")
    no_op_runs(pipe)
    messages = MESSAGES if args.batch == 1 else [MESSAGES] * args.batch
    print(f"decode loop, host time per step (us), onnxruntime's run a no-op; {args.tokens} tokens, batch {args.batch}, {args.repeats} runs")
    print(f"{'form':28}{'median':>8}{'min':>8}{'max':>8}")
    for name, kwargs in forms(args.tokens).items():
        if args.batch > 1 and kwargs.get("stream"):
            continue  # (a stream is one answer)
        step_us(pipe, messages, kwargs)  # warm-up
        runs = [step_us(pipe, messages, kwargs) for _ in range(args.repeats)]
        print(f"{name:28}{statistics.median(runs):8.1f}{min(runs):8.1f}{max(runs):8.1f}")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.repeats):
            step_us(pipe, messages, forms(args.tokens)["greedy"])
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
