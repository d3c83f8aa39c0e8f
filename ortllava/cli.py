"""`ortllava`: generate from a bundle, chat with it, describe one, or benchmark against transformers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path


LONG_LOAD_BYTES = 2**30  # bundles past this size say on stderr what their load is doing (it takes seconds)


def _load(args: argparse.Namespace):
    """The bundle as `load` gives it; for a large one, a line before (what the load does) and after (its time)."""
    import time

    from .api import load

    size = sum(path.stat().st_size for path in args.bundle.iterdir() if path.is_file()) if args.bundle.is_dir() else 0
    if size > LONG_LOAD_BYTES:
        checks = "checking every file's sha256 (--no-verify skips it), then " if not args.no_verify else ""
        print(f"loading {size / 2**30:.1f} GiB of bundle files: {checks}creating the sessions ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    pipe = load(args.bundle, provider=args.provider, verify=not args.no_verify, threads=args.threads)
    if size > LONG_LOAD_BYTES:
        print(f"loaded in {time.perf_counter() - start:.1f} s on {pipe.provider}", file=sys.stderr, flush=True)
    return pipe


def _generate(args: argparse.Namespace) -> int:
    pipe = _load(args)
    images = args.image or []
    if args.prompt == "-":  # the prompt from stdin
        args.prompt = sys.stdin.read().strip()
        if not args.prompt:  # (say, the command before this one in a pipe failed)
            raise ValueError("--prompt - read an empty prompt from stdin")
    if not args.prompt.strip() and not images:
        raise ValueError("the prompt is empty: give --prompt TEXT, an --image, or both")
    if not args.raw and pipe.processor.chat_template and pipe.processor.image_token in args.prompt:
        raise ValueError(
            f"the chat template places one {pipe.processor.image_token} per --image itself: leave it out of --prompt "
            "(or pass --raw to use the prompt as written)"
        )
    if args.raw or not pipe.processor.chat_template:
        # The prompt is used as written; images go where its <image> tokens are (or first, if it has none).
        token = pipe.processor.image_token
        held = args.prompt.count(token)
        if held and held != len(images):
            raise ValueError(f"the prompt holds {held} {token} token(s) but {len(images)} --image was given: one --image per {token}, in order")
        prompt = args.prompt if held else (token + "\n") * len(images) + args.prompt
        inputs = dict(prompt=prompt, images=images or None)
    else:
        content = [{"type": "image", "path": path} for path in images] + [{"type": "text", "text": args.prompt}]
        inputs = dict(messages=[{"role": "user", "content": content}])
    options = _generation_options(args, pipe)
    answers = args.num_return_sequences
    if answers is not None:
        if args.stream and answers != 1:
            raise ValueError("--stream prints one answer: leave out --num-return-sequences, or --stream")
        options["num_return_sequences"] = answers
        single = pipe.settings(**{**options, "num_return_sequences": 1})
        if answers > 1 and not single.do_sample and single.num_beams == 1:  # (checked before the images are read)
            raise ValueError(
                "--num-return-sequences gives several sampled answers, or the best beams: add --do-sample or --num-beams "
                "(greedy ones would all be the same)"
            )
        pipe.settings(**options)
    if args.stream:
        for chunk in pipe.stream(**inputs, **options):
            print(chunk.text, end="", flush=True)
        print()
        metrics, reason = chunk.metrics, chunk.finish_reason
    elif answers is not None and answers > 1:
        results = pipe.generate(**inputs, **options)
        for index, result in enumerate(results, start=1):
            print(f"--- answer {index} of {answers} ---")
            print(result.text)
        metrics, reason = results[0].metrics, ", ".join(result.finish_reason for result in results)
    else:
        result = pipe.generate(**inputs, **options)
        print(result.text)
        metrics, reason = result.metrics, result.finish_reason
    if args.timings:
        _print_timings(metrics, reason)
    return 0


# Generation options of `generate` and `chat`: (flag, argparse options, help); each is `Pipeline.generate`'s argument
# of the same name (--negative-prompt: its text tokenized, as negative_prompt_ids), unset (None) unless given.
GENERATION_FLAGS = (
    ("--max-new-tokens", dict(metavar="N", type=int), "default: the bundle's generation config, else 256 (fewer where a long prompt leaves less room)"),
    ("--do-sample", dict(action=argparse.BooleanOptionalAction), "sample the answer (default: as the bundle's generation config says, else greedy)"),
    ("--temperature", dict(metavar="T", type=float), "sampling: divide the logits by this"),
    ("--top-k", dict(metavar="K", type=int), "sampling: only the k most probable tokens (0: all)"),
    ("--top-p", dict(metavar="P", type=float), "sampling: only the most probable tokens that hold this much of the probability"),
    ("--min-p", dict(metavar="P", type=float), "sampling: only tokens at least this fraction as probable as the most probable one"),
    ("--typical-p", dict(metavar="P", type=float), "sampling: only the tokens whose information is nearest the entropy, this much of the probability"),
    ("--seed", dict(metavar="SEED", type=int), "sampling: the random seed (the same seed gives the same answer)"),
    ("--repetition-penalty", dict(metavar="R", type=float), "penalize tokens already in the prompt or answer (>1; as transformers: positive scores divided by it, negative ones multiplied)"),
    ("--no-repeat-ngram-size", dict(metavar="N", type=int), "no sequence of N tokens (the prompt's included) occurs twice"),
    ("--guidance-scale", dict(metavar="G", type=float), "classifier-free guidance, as transformers' guidance_scale: above 1 steers the answer away from --negative-prompt (default: the prompt's last token)"),
    ("--negative-prompt", dict(metavar="TEXT"), "with --guidance-scale: the text to steer away from (tokenized as written, without the chat template)"),
    ("--num-beams", dict(metavar="N", type=int), "beam search over N hypotheses, as transformers' (with --do-sample: beam sampling; not with --stream or chat)"),
    ("--stop", dict(metavar="TEXT", action="append"), "a string that ends the answer where it appears (repeat for several)"),
    ("--max-time", dict(metavar="SECONDS", type=float), "end the answer after this many seconds (what is generated by then is kept)"),
)
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p", "typical_p", "seed")


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    for flag, options, help_text in GENERATION_FLAGS:
        parser.add_argument(flag, help=help_text, **options)


def _generation_options(args: argparse.Namespace, pipe) -> dict:
    """The generation flags given, checked now (a bad value or a sampling flag without sampling is an error
    naming it, before any graph runs)."""
    from .generation.settings import SettingError

    given = {name: getattr(args, name) for name in (flag[2:].replace("-", "_") for flag, _, _ in GENERATION_FLAGS)}
    given = {name: value for name, value in given.items() if value is not None}
    if "negative_prompt" in given:  # (the one flag that is no argument of generate's: its text, tokenized)
        if given.get("guidance_scale", pipe.settings().guidance_scale) == 1:  # (the bundle's generation config may set it)
            raise ValueError("--negative-prompt applies only with --guidance-scale (other than 1)")
        given["negative_prompt_ids"] = [pipe.processor.tokenizer(given.pop("negative_prompt"))["input_ids"]]
    try:
        with warnings.catch_warnings():  # (a sampling flag without --do-sample is refused below, rather than warned of)
            warnings.simplefilter("ignore")
            settings = pipe.settings(**given)
    except SettingError as error:  # said with the flag's name and as it was typed
        if error.name not in given:
            raise
        value = error.value if error.name != "stop" else next(text for text in error.value if not text)
        raise ValueError(f"--{error.name.replace('_', '-')} must be {error.want}, got {value!r}") from None
    idle = [f"--{name.replace('_', '-')}" for name in SAMPLING_ONLY if name in given and not settings.do_sample]
    if idle:
        raise ValueError(f"{', '.join(idle)} only {'apply' if len(idle) > 1 else 'applies'} when sampling: add --do-sample")
    return given


def _print_timings(metrics, reason: str | None) -> None:
    print(
        f"[{metrics.prompt_tokens} prompt tokens, {metrics.prefilled_tokens} prefilled, {metrics.generated_tokens} new; "
        f"time to first token {metrics.time_to_first_token_s * 1000:.0f} ms, "
        + (f"decode {metrics.decode_tokens_per_s:.1f} tokens/s" if metrics.generated_tokens > 1 else "no decode steps (one new token)")
        + f"; finish: {reason}]",
        file=sys.stderr,
    )


def _info(args: argparse.Namespace) -> int:
    import time

    from .bundle.manifest import BundleError, read_manifest

    try:
        manifest, damage = read_manifest(args.bundle, verify=not args.no_verify), None
    except BundleError as error:  # a damaged file: still say what the bundle is (a bad manifest raises again here)
        manifest, damage = read_manifest(args.bundle, check_files=False), error
    bundle = Path(args.bundle)
    if args.json:  # the manifest alone, for tools
        print(json.dumps(json.loads((bundle / "manifest.json").read_text()), indent=2))
        if damage is not None:
            raise damage
        return 0
    sizes = {p.name: p.stat().st_size for p in bundle.iterdir() if p.is_file()}
    text, vision = manifest.text, manifest.vision
    decoder = manifest.graphs["decoder"]
    print(f"bundle      {bundle} ({sum(sizes.values()) / 2**20:.1f} MiB, schema {manifest.schema_version}, {manifest.precision})")
    revision = manifest.provenance.get("revision")
    print(f"source      {manifest.provenance.get('source')}{f' @ {revision}' if revision else ''}")
    print(f"decoder     {text.architecture}: {text.num_layers} layers, hidden {text.hidden_size}, "
          f"{text.num_attention_heads} heads / {text.num_key_value_heads} kv, vocab {text.vocab_size}, "
          f"{text.max_position_embeddings} positions; {decoder.dtype}, {DECODER_KINDS.get(decoder.kind, decoder.kind + ' decoder')}"
          f"{', key/value cache ' + decoder.kv_dtype if decoder.kv_dtype else ''}")
    if decoder.quantization:
        q = decoder.quantization
        print(f"            weights {q.get('method')} {q.get('bits')}-bit, block {q.get('block_size')}, "
              f"{'symmetric' if q.get('symmetric') else 'asymmetric'}, lm_head {'quantized' if q.get('quantize_lm_head') else 'kept'}, "
              f"accuracy level {q.get('accuracy_level') or 'the provider default'}")
    print(f"runs on     {_where_it_runs(decoder)}")
    grids = ", ".join(f"{height}x{width}" for height, width in vision.grid_pinpoints)
    print(f"vision      {vision.image_size} px tiles of {vision.patch_size} px patches; features from layer{'s' * (len(vision.feature_layers) > 1)} "
          f"{', '.join(map(str, vision.feature_layers))} ({SELECT_STRATEGIES.get(vision.select_strategy, vision.select_strategy)}); anyres grids (height x width px) {grids}")
    for name, spec in manifest.graphs.items():
        files = [spec.file, *spec.external_data]
        size = sum(sizes.get(f, 0) for f in files)
        shown = f"{size / 2**20:10.1f} MiB" if size >= 2**20 // 10 else f"{size / 2**10:10.1f} KiB"  # (kv_reorder, feature_splice: a few KiB)
        print(f"size        {name:15} {shown}  ({', '.join(files)}){GRAPH_ROLES.get(name, '')}")
    print(f"size        {'embeddings':15} {sizes.get('embed_tokens.npy', 0) / 2**20:10.1f} MiB")
    if manifest.validation:
        graphs = " (the float graphs, before 4-bit quantization: the accuracy report measures the shipped one)" if decoder.quantization else ""
        print(f"validation  max |onnx - torch|{graphs}: " + ", ".join(f"{k} {v:.2e}" for k, v in manifest.validation.items()))
    else:
        print("validation  none: exported with --no-validate")
    if manifest.accuracy:
        a = manifest.accuracy
        print(f"accuracy    vs {a['reference']}: top-1 agreement {a['top1_agreement'] * 100:.1f}% over {a['positions']} positions "
              f"({a['prompts']} prompts); logit diff max {a['max_abs_logit_diff']:.3g}, mean {a['mean_abs_logit_diff']:.3g}"
              + (f"; measured with {a['provider']}" if a.get("provider") else ""))
    if damage is not None:
        raise damage  # (after the report: the error is the last thing printed, and the exit status says so)
    if not args.no_load:
        from .api import load

        start = time.perf_counter()
        pipe = load(bundle, provider=args.provider, verify=False)
        print(f"load        {time.perf_counter() - start:.2f} s on {pipe.provider} (sessions, embeddings, tokenizer)")
    return 0


# How `info` names a decoder kind, and what a graph other than the three main ones is for.
DECODER_KINDS = {"gqa": "fused attention over preallocated key/value buffers (gqa)", "concat": "plain ONNX attention, portable (concat)"}
GRAPH_ROLES = {"kv_reorder": "  beam search's row gather on a GPU", "feature_splice": "  image features into the prompt's embeddings on a GPU"}
SELECT_STRATEGIES = {"default": "class token dropped", "full": "class token kept"}


def _where_it_runs(decoder) -> str:
    """The execution providers a bundle's decoder is for, and why where it is not for both."""
    from .bundle.sessions import not_for_cuda

    reasons = not_for_cuda(decoder)
    if reasons:
        return f"the CPU provider only ({'; '.join(reasons)})"
    if decoder.dtype == "float16":
        return "CUDA (fp16 activations; the CPU provider runs them several times slower)"
    return "the CPU and CUDA providers"


BUNDLE_HELP = "a bundle folder, as ortllava-export writes it"
THREADS_HELP = "CPU threads each graph runs on (default: onnxruntime's, one per core)"
NO_VERIFY_HELP = "skip the sha256 check of every bundle file at load (~1 s per GB; files are still checked to exist)"
CHAT_HELP = "commands: /image PATH_OR_URL (attach to the next message), /reset (forget the conversation), /quit; //text sends /text"


def _chat(args: argparse.Namespace) -> int:
    from .preprocess.image_source import ImageLoadError, load_image

    pipe = _load(args)
    session = pipe.chat(system=args.system, **_generation_options(args, pipe))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"ortllava chat on {pipe.provider}; {CHAT_HELP}", file=sys.stderr)
    pending: list = []  # images for the next message
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF
            if pending:
                print(f"[{len(pending)} attached image(s) not sent: no message followed]", file=sys.stderr)
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("//"):  # a message that starts with "/" (such as a path), its first "/" doubled
            line = line[1:]
        elif line.startswith("/"):
            command, _, argument = line.partition(" ")
            argument = argument.strip()
            if command == "/quit":
                if pending:
                    print(f"[{len(pending)} attached image(s) not sent: no message followed]", file=sys.stderr)
                break
            if command == "/reset":
                session.reset()
                pending = []
                print("[conversation cleared]", file=sys.stderr)
            elif command == "/image" and not argument:
                print("ortllava: /image needs a path or URL", file=sys.stderr)
            elif command == "/image":
                try:
                    pending.append(load_image(argument))
                    print(f"[image attached: {argument}]", file=sys.stderr)
                except ImageLoadError as error:
                    print(f"ortllava: error: {error}", file=sys.stderr)
            else:
                print(f"ortllava: unknown command {line!r}; {CHAT_HELP}", file=sys.stderr)
            continue
        images, pending = pending, []
        stream = chunk = None
        try:
            stream = session.stream(line, images=images or None)  # (the turn is checked here: a bad line is said below)
            for chunk in stream:
                print(chunk.text, end="", flush=True)
            print(flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops the answer (what was shown stays in the conversation); at the prompt it quits
            if stream is not None:
                stream.close()
            print("\n[stopped]", file=sys.stderr)
            continue
        except (ImageLoadError, ValueError, RuntimeError, FloatingPointError) as error:
            print(f"\nortllava: error: {error}", file=sys.stderr)
            continue
        if args.timings and chunk is not None and chunk.metrics is not None:
            _print_timings(chunk.metrics, chunk.finish_reason)
    return 0


def _precisions(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ("fp32", "fp16", "int4")]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"precisions are fp32, fp16 and int4, each at most once; got {text!r}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _at_least_two(text: str) -> int:
    """`--new-tokens`: the decode figure is the time from the first new token to the last, so it needs two."""
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 2 (the decode figure needs two tokens), got {text!r}")
    return value


def _bench(args: argparse.Namespace) -> int:
    int4_options = {"--block-size": args.block_size is not None, "--quantize-lm-head": args.quantize_lm_head,
                    "--accuracy-level": args.accuracy_level is not None, "--kv-cache": args.kv_cache != "auto"}
    given = [flag for flag, set_ in int4_options.items() if set_]
    if given and "int4" not in args.precision:
        raise ValueError(f"{', '.join(given)} only apply to int4 bundles: add int4 to --precision")
    for path in (args.json, args.plot):  # checked now rather than lost after the whole run
        if path is not None and not path.resolve().parent.is_dir():
            raise ValueError(f"cannot write {path}: its folder does not exist")
    try:
        from ortllava_export.cli import missing_dependencies
    except ImportError as error:
        raise RuntimeError(f"ortllava bench needs the exporter: pip install 'ortllava[export]' ({error})") from error
    missing = missing_dependencies()
    if missing:  # the benchmark exports the model and runs transformers too
        raise RuntimeError(f"ortllava bench needs {' and '.join(missing)}: pip install 'ortllava[export]' (torch: its CPU build is enough)")
    from ortllava_export.bench.plot import write_svg
    from ortllava_export.bench.run import bench
    from ortllava_export.graphs.quantize import Int4Options
    report = bench(
        args.model, provider=args.provider, precision=args.precision, layers=args.layers, new_tokens=args.new_tokens,
        repeats=args.repeats, threads=args.threads, output=args.json, bundle=args.bundle, cuda_graph=args.cuda_graph,
        max_length=args.max_length, int4=Int4Options(args.block_size or Int4Options.block_size, True, args.quantize_lm_head, args.accuracy_level),
        text_only=args.text_only, kv_cache=args.kv_cache,
    )
    if args.plot:
        write_svg(report, args.plot)
        print(f"plot written to {args.plot}")
    return 0



def _provider(value: str) -> str:
    """An argparse type: "auto", "cpu", "cuda" or "cuda:N" (GPU N)."""
    from .bundle.sessions import is_provider

    if is_provider(value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: give auto, cpu, cuda or cuda:N (a GPU index)")

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ortllava", description="LLaVA-NeXT on onnxruntime.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="answer a prompt about images")
    gen.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    gen.add_argument("--image", action="append", help="image path or URL (repeat for several)")
    gen.add_argument("--prompt", required=True, help="the question ('-': read it from stdin)")
    gen.add_argument("--provider", default="auto", type=_provider, help="auto, cpu, cuda or cuda:N (GPU N)")
    gen.add_argument("--threads", type=_positive, help=THREADS_HELP)
    _add_generation_flags(gen)
    gen.add_argument(
        "--num-return-sequences", metavar="N", type=_positive,
        help="sampling: N answers, each sampled on its own (the prompt runs once), printed under '--- answer i of N ---' lines",
    )
    gen.add_argument("--raw", action="store_true", help="use the prompt as written, without the chat template (images go where its <image> tokens are, or first)")
    gen.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    gen.add_argument("--timings", action="store_true", help="print timings to stderr")
    gen.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    gen.set_defaults(run=_generate)

    info = commands.add_parser("info", help="describe a bundle")
    info.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    info.add_argument("--json", action="store_true", help="print the manifest (JSON) instead of the report")
    info.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    info.add_argument("--no-load", action="store_true", help="skip timing a load of the bundle")
    info.add_argument("--provider", default="auto", type=_provider, help="where to time the load: auto, cpu, cuda or cuda:N")
    info.set_defaults(run=_info)

    chat = commands.add_parser("chat", help="talk with the model, keeping the conversation (stdin: lines, /image, /reset, /quit)")
    chat.add_argument("bundle", type=Path, help=BUNDLE_HELP)
    chat.add_argument("--provider", default="auto", type=_provider, help="auto, cpu, cuda or cuda:N (GPU N)")
    chat.add_argument("--threads", type=_positive, help=THREADS_HELP)
    _add_generation_flags(chat)
    chat.add_argument("--system", help="a system message for the conversation")
    chat.add_argument("--timings", action="store_true", help="print tokens and timings to stderr after each answer")
    chat.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    chat.set_defaults(run=_chat)

    bench = commands.add_parser("bench", help="ortllava against transformers on the same weights and inputs")
    bench.add_argument("model", help="checkpoint (hub id or folder) or a random shape: cpu-mid, mistral-7b, tiny")
    bench.add_argument("--provider", default="cpu", choices=["cpu", "cuda"], help="where both run (default: cpu; cuda: transformers in fp16 on the GPU)")
    bench.add_argument(
        "--precision", default=["fp32"], type=_precisions,
        help="fp32, fp16 or int4; several, comma-separated (fp32,int4), alternate in the same runs",
    )
    bench.add_argument("--block-size", type=int, choices=[16, 32, 64, 128, 256], help="int4: input rows per scale (default 32)")
    bench.add_argument("--quantize-lm-head", action="store_true", help="int4: quantize the lm_head too")
    bench.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], help="int4: MatMulNBits compute type (4: int8 on the CPU)")
    bench.add_argument(
        "--kv-cache", default="auto", choices=["auto", "float", "int8"], help="int4: the key/value cache (auto: int8 on the CPU, float on CUDA)",
    )
    bench.add_argument("--layers", type=_positive, help="decoder layers of a random shape (the floor ratio does not depend on it)")
    bench.add_argument("--new-tokens", type=_at_least_two, default=64, help="tokens each run generates, at least 2 (default: 64)")
    bench.add_argument("--repeats", type=_positive, default=3, help="runs of each contender, alternating; the table shows medians (default: 3)")
    bench.add_argument("--threads", type=_positive, help="CPU threads for both (default: all cores)")
    bench.add_argument("--bundle", type=Path, help="export here (or reuse the bundle found here) instead of a temporary folder")
    bench.add_argument("--json", type=Path, help="write the report here")
    bench.add_argument("--plot", type=Path, help="draw the report here (SVG): where the time goes, and decode against its floor")
    bench.add_argument("--cuda-graph", action="store_true", help="replay the decode step as a CUDA graph")
    bench.add_argument("--max-length", type=_positive, help="preallocate the key/value buffers to this many positions")
    bench.add_argument("--text-only", action="store_true", help="ask about no image: a short context, where the weights dominate a step")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # an answer the terminal's encoding cannot show is shown in part, never lost
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    from .bundle.manifest import BundleError
    from .preprocess.image_source import ImageLoadError

    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *rest, **named: f"ortllava: warning: {message}\n"  # not a source line
    try:
        return args.run(args)
    except (BundleError, ImageLoadError, ValueError, RuntimeError, FloatingPointError, OSError) as error:
        if isinstance(error, BrokenPipeError):  # the reader went away (`ortllava info ... | head`): nothing to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit would fail too)
            return 1
        print(f"ortllava: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
