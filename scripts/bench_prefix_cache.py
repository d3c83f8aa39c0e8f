"""What `ortllava.load(..., prefix_cache=True)` saves: several questions about one image, one after another, with
and without the kept cache (two pipelines on one bundle, taking turns), and whether their answers are the same.

    python scripts/bench_prefix_cache.py BUNDLE [--questions 6] [--threads 2] [--new-tokens 16]

Prints, for each question after the first: the time to first token and the tokens prefilled, both ways.
"""

from __future__ import annotations

import argparse
import statistics

QUESTIONS = ["What is shown in this image?", "Describe the colours.", "Is there any text?", "What is in the corner?",
             "Count the objects.", "Where could this be?", "What is the mood?", "Describe the light."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--questions", type=int, default=6, choices=range(2, len(QUESTIONS) + 1), metavar=f"2..{len(QUESTIONS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    import ortllava
    from ortllava_export.photos import photo  # the benchmark's 600x400 photo

    image = photo(600, 400, 0)
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    pipes = {
        "without": ortllava.load(args.bundle, provider="cpu", threads=args.threads, verify=False),
        "prefix_cache": ortllava.load(args.bundle, provider="cpu", threads=args.threads, verify=False, prefix_cache=True),
    }
    for pipe in pipes.values():  # warm up on another image (the cached pipe must not keep this one's prefix)
        pipe.generate(messages=[{"role": "user", "content": [{"type": "image", "image": photo(300, 300, 9)}, {"type": "text", "text": "Hi"}]}], **options)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    same = True
    for index, question in enumerate(QUESTIONS[: args.questions]):
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        results = {name: pipe.generate(messages=messages, **options) for name, pipe in pipes.items()}
        same &= results["without"].token_ids == results["prefix_cache"].token_ids
        line = []
        for name, result in results.items():
            m = result.metrics
            if index:  # the first question fills the cache
                times[name].append(m.time_to_first_token_s * 1000)
            line.append(f"{name}: {m.time_to_first_token_s * 1000:.0f} ms to first token, {m.prefilled_tokens}/{m.prompt_tokens} prefilled")
        print(f"question {index + 1}: " + "; ".join(line))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"median time to first token, questions 2-{args.questions}: without {medians['without']:.0f} ms, "
          f"prefix_cache {medians['prefix_cache']:.0f} ms ({medians['without'] / medians['prefix_cache']:.1f}x faster); "
          f"answers identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
