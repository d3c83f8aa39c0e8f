"""`ortllava-export`: a LLaVA-NeXT checkpoint -> a bundle folder, stage by stage, with progress."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ortllava.bundle.manifest import FEATURE_SPLICE_GRAPH, KV_REORDER_GRAPH, reading_export_scratch
from ortllava.generation.settings import shown_settings, unsupported_generation_settings

from .checkpoint import Checkpoint, computing_in_fp32, load_checkpoint, model_source
from .graphs.quantize import Int4Options
from .output import DEFAULT_HOME, check_output, default_output, scratch_folder
from .plan import DECODER_KINDS, PRECISIONS, TARGETS, ExportPlan, plan_export


class Progress:
    """Numbered stages on stderr, each with its time: `[3/7] Building the decoder: done in 2.1 s`.

    An error raised inside a stage leaves the stage's label on it (`failed_stage`), so the message that reports
    it can say which stage failed."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    @contextmanager
    def stage(self, text: str):
        _stop_if_signalled()
        self.index += 1
        label = f"[{self.index}/{self.total}] {text}"
        print(f"{label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except Exception as error:
            if failed_stage(error) is None:  # the innermost stage names it
                with contextlib.suppress(AttributeError):  # (an exception type without a __dict__: unnamed)
                    error.ortllava_export_stage = label
            raise
        print(f"{label}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


_SIGNALLED: list[int] = []  # the termination signals `main` received


def _on_termination(signum: int, frame) -> None:
    """SIGTERM's handler: unwinds the export as Ctrl-C does. The SystemExit it raises can be lost where the signal
    lands in code that swallows exceptions (a finalizer, a bare except in a library), so the signal is also kept,
    and the next stage or the final move refuses to go on (`_stop_if_signalled`)."""
    _SIGNALLED.append(signum)
    sys.exit(128 + signum)


def _stop_if_signalled() -> None:
    if _SIGNALLED:
        sys.exit(128 + _SIGNALLED[0])


def failed_stage(error: BaseException) -> str | None:
    """The label of the export stage `error` was raised in (`[6/8] Validating ...`), or None."""
    return getattr(error, "ortllava_export_stage", None)


def export_bundle(
    model: str | Checkpoint, output: Path, precision: str = "fp32", revision: str | None = None, validate: bool = True,
    decoder: str = "gqa", target: str = "cuda", int4: Int4Options | None = None, kv_cache: str = "auto",
) -> Path:
    """Exports `model` (hub id, folder, "tiny", or a loaded `Checkpoint`) into the bundle folder `output`; returns it.

    `precision`: "fp32"; "fp16" (for CUDA); "int4": 4-bit decoder weights (`int4` options), with fp16
    activations, vision encoder and projector when `target` is "cuda", fp32 ones when it is "cpu".
    `decoder`: "gqa" (fused attention over a shared, preallocated key/value buffer; the fast path) or
    "concat" (plain ONNX ops, present = past ++ new; the portable fallback, fp32 activations).
    `kv_cache`: "float" (the activations' dtype), "int8" (a "gqa" decoder's key/value buffers quantized with
    calibrated per-channel scales; CPU provider only), or "auto": int8 for int4 `--target cpu` gqa bundles, float
    otherwise.
    With `validate`, each graph is checked against PyTorch and the accuracy report is measured.
    `output` must be new, an empty folder, or an earlier bundle (replaced once the new one is complete).
    """
    from .families import UnsupportedModelError
    from .graphs.fused_decoder import unsupported_features

    plan = plan_export(precision, decoder, target, validate, int4, kv_cache)
    if not isinstance(model, Checkpoint):
        model_source(model, revision)  # (a mistyped folder or a misplaced --revision: said before anything loads)
    output = Path(os.path.abspath(output))
    check_output(output)
    total = time.perf_counter()

    def check_config(config) -> None:  # before the weights load: refuse what the fused graph does not implement
        if decoder == "gqa" and (missing := unsupported_features(config)):
            raise UnsupportedModelError(f"the fused decoder does not implement this checkpoint's {'; '.join(missing)}: export it with --decoder concat")

    # Written into a scratch folder beside `output`, then moved in place: a failed export leaves no half bundle.
    with scratch_folder(output) as work:
        progress = Progress(_stage_count(plan))
        with progress.stage(f"Loading checkpoint {getattr(model, 'source', model)}"):
            # Fused exports keep the decoder as stored (memory-mapped; the graph converts one weight at a time,
            # PyTorch one module at a time: `computing_in_fp32`); the traced concat graph takes the dtype its
            # weights have.
            owned = not isinstance(model, Checkpoint)  # loaded here: its weights may be let go once the graphs are built
            if not owned:
                check_config(model.model.config)
                checkpoint = model
            else:
                checkpoint = load_checkpoint(model, revision, stored_dtype=decoder == "gqa", check_config=check_config)
        _export_into(work, checkpoint, plan, progress, release_weights=owned)
        _stop_if_signalled()  # (a termination whose exception something swallowed: no bundle, as for any other)
    print(f"Bundle written to {output} in {time.perf_counter() - total:.1f} s", file=sys.stderr)
    return output


def _stage_count(plan: ExportPlan) -> int:
    """The stages `export_bundle` and `_export_into` show (see the latter)."""
    quantize_stage = plan.quantized and (plan.validate or plan.decoder == "concat")  # (gqa unvalidated: built quantized)
    return 5 + 3 * plan.validate + (plan.kv_cache == "int8") + quantize_stage


def _export_into(work: Path, checkpoint: Checkpoint, plan: ExportPlan, progress: Progress, release_weights: bool = False) -> None:
    """The export's stages after loading: every file of the bundle, written into `work`.

    Two phases, so a large model's weights are never held twice: first everything that needs PyTorch (the
    graphs, built from its weights, and the references validation and the accuracy report compare with),
    then, with `release_weights`, the model's weights are let go, and onnxruntime checks the graphs.
    """
    import numpy as np

    from .bundle import build_manifest, write_assets, write_manifest
    from .checks.accuracy import accuracy_references, accuracy_report
    from .checks.validate import check, references
    from .graphs.convert import convert_to_fp16, export_decoder, export_projector, export_vision_encoder
    from .graphs.feature_splice import build_feature_splice
    from .graphs.fused_decoder import build_fused_decoder
    from .graphs.kv_cache import calibrate_kv_scales
    from .graphs.kv_reorder import build_kv_reorder
    from .graphs.quantize import quantize_decoder

    stage, int4, decoder = progress.stage, plan.int4, plan.decoder
    dtype = np.float16 if plan.half else np.float32
    graphs = {}
    with stage(f"Exporting vision encoder and projector ({'fp16' if plan.half else 'fp32'})"):
        graphs["vision_encoder"] = export_vision_encoder(checkpoint.model, work / "vision_encoder.onnx")
        graphs["projector"] = export_projector(checkpoint.model, work / "projector.onnx")
        if plan.half:
            for name in ("vision_encoder", "projector"):
                convert_to_fp16(graphs[name], work)
    kv_scales = None
    if plan.kv_cache == "int8":
        with stage("Calibrating the int8 key/value cache (PyTorch prefills of 3 prompts with images)"), computing_in_fp32(checkpoint.model):
            kv_scales = calibrate_kv_scales(checkpoint)
    # An unvalidated quantized fused decoder is built quantized at once. A validated one is built twice from the
    # weights: in float first (decoder.float.onnx, deleted once validated), then quantized (decoder.onnx).
    quantize_at_build = plan.quantized and decoder == "gqa" and not plan.validate
    float_beside = plan.quantized and decoder == "gqa" and plan.validate
    float_file = work / ("decoder.float.onnx" if float_beside else "decoder.onnx")
    quantized_parts = ", ".join(
        ([f"weights to 4 bits (block {int4.block_size}, {'symmetric' if int4.symmetric else 'asymmetric'})"] if int4 else [])
        + (["key/value cache to int8"] if kv_scales else [])
    )
    with stage(f"Building the {decoder} decoder ({plan.decoder_precision}{'; ' + quantized_parts if quantize_at_build else ''})"):
        if decoder == "gqa":
            at_build = dict(int4=int4, kv_scales=kv_scales) if quantize_at_build else {}
            graphs["decoder"] = build_fused_decoder(checkpoint.model, float_file, plan.decoder_precision, **at_build)
        else:
            graphs["decoder"] = export_decoder(checkpoint.model, float_file)
    if plan.validate:
        with stage("Running PyTorch on the validation cases and the accuracy prompts"), computing_in_fp32(checkpoint.model):
            validation_refs = references(checkpoint.model, decoder)
            accuracy_refs = accuracy_references(checkpoint)
    if float_beside:
        with stage(f"Quantizing the decoder: {quantized_parts}"):  # built again from the weights, each quantized as it is read
            float_spec = graphs["decoder"]
            graphs["decoder"] = build_fused_decoder(checkpoint.model, work / "decoder.onnx", plan.decoder_precision, int4, kv_scales)
    with stage("Writing embeddings, tokenizer, chat template and configs"):
        write_assets(checkpoint, work, np.float16 if plan.decoder_precision == "fp16" else np.float32)
    ignored = unsupported_generation_settings(checkpoint.model.generation_config.to_diff_dict())
    if ignored:
        settings = shown_settings(ignored)
        print(f"      warning: the generation config sets {settings}, which the ortllava runtime does not implement", file=sys.stderr)
    if release_weights:  # (configs stay: the manifest reads them)
        checkpoint.model.to("meta")
        gc.collect()
    validation = {}
    if plan.validate:
        # The float graphs are checked (the wiring, to a tight tolerance); the accuracy report (the last stage)
        # then measures what 4-bit weights and the int8 cache cost in the shipped one.
        with stage("Validating graphs against PyTorch on untraced shapes"):
            validation = check(validation_refs, work / "vision_encoder.onnx", work / "projector.onnx", float_file, dtype)
            print("      max |onnx - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in validation.items()), file=sys.stderr)
        if float_beside:
            for name in (float_spec.file, *float_spec.external_data):
                (work / name).unlink()
    if plan.quantized and decoder == "concat":
        with stage(f"Quantizing the decoder: {quantized_parts}"):
            quantize_decoder(graphs["decoder"], work, int4)
    graphs[KV_REORDER_GRAPH] = build_kv_reorder(work / "kv_reorder.onnx", graphs["decoder"])
    if decoder == "gqa":  # (the runtime gathers a prompt's embeddings on the device for a fused decoder only)
        graphs[FEATURE_SPLICE_GRAPH] = build_feature_splice(work / "feature_splice.onnx", graphs["projector"], graphs["decoder"])
    with stage("Hashing files and writing the manifest"):
        manifest = build_manifest(checkpoint, graphs, work, plan.precision, validation)
        write_manifest(manifest, work)
    if plan.validate:
        with stage("Measuring accuracy against the fp32 PyTorch model (teacher-forced)"):
            with reading_export_scratch():  # (the runtime refuses a scratch folder to all but its exporter)
                manifest.accuracy = accuracy_report(accuracy_refs, work)
            write_manifest(manifest, work)
            a = manifest.accuracy
            print(f"      top-1 agreement {a['top1_agreement'] * 100:.1f}% over {a['positions']} positions, "
                  f"logit diff max {a['max_abs_logit_diff']:.3g} mean {a['mean_abs_logit_diff']:.3g}", file=sys.stderr)


def missing_dependencies() -> list[str]:
    """The exporter's packages that are not installed (a runtime-only install has none of them); this module
    imports none of them at the top, so that it can say so."""

    def installed(package: str) -> bool:
        try:
            return importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a broken or blocked package
            return False

    return [name for name in ("torch", "transformers", "onnx", "onnxscript") if not installed(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ortllava-export", description="Export a LLaVA-NeXT checkpoint to an ortllava bundle.")
    parser.add_argument("--model", required=True, help="hub id, local checkpoint folder, or 'tiny' (built-in random model)")
    parser.add_argument("--output", type=Path, help=f"bundle folder (default: {DEFAULT_HOME}/<model name>)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS, help="weights precision of the graphs (fp16: for CUDA)")
    parser.add_argument(
        "--decoder", default="gqa", choices=DECODER_KINDS,
        help="gqa: fused attention over a preallocated key/value buffer (fast); concat: plain ONNX ops (portable, fp32)",
    )
    parser.add_argument(
        "--target", choices=TARGETS,
        help="int4 only: fp16 activations and vision for CUDA (the default), or fp32 and an int8 key/value cache for the CPU",
    )
    parser.add_argument("--block-size", type=int, help="int4: input rows per scale (16, 32 (default), 64, 128, 256)")
    parser.add_argument("--asymmetric", action="store_true", help="int4: a zero point per block")
    parser.add_argument("--quantize-lm-head", action="store_true", help="int4: quantize the lm_head too (smaller, less accurate)")
    parser.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], help="int4: MatMulNBits compute type (4: int8, CPU)")
    parser.add_argument(
        "--kv-cache", default="auto", choices=["auto", "float", "int8"],
        help="int8: key/value cache in int8 with calibrated scales (4x fewer bytes per step; gqa decoder with fp32 "
        "activations, CPU provider); auto (default): int8 for int4 --target cpu, float otherwise",
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the ONNX-vs-PyTorch checks and the accuracy report (not recommended)")
    args = parser.parse_args(argv)
    int4_only = {"--target": args.target, "--block-size": args.block_size, "--asymmetric": args.asymmetric or None,
                 "--quantize-lm-head": args.quantize_lm_head or None, "--accuracy-level": args.accuracy_level}
    given = [option for option, value in int4_only.items() if value is not None]
    if given and args.precision != "int4":
        parser.error(f"{', '.join(given)}: {'this option applies' if len(given) == 1 else 'these options apply'} to --precision int4 only")
    try:  # before torch is imported: a mistyped folder is said at once
        model_source(args.model, args.revision)
    except FileNotFoundError as error:
        print(f"ortllava-export: error: {error}", file=sys.stderr)
        return 1
    missing = missing_dependencies()
    if missing:
        print(f"ortllava-export: error: needs {' and '.join(missing)}: pip install 'ortllava[export]' (torch: its CPU build is enough)", file=sys.stderr)
        return 1
    from .checks.validate import ExportValidationError
    from .families import UnsupportedModelError

    # A termination signal (a timeout, a job scheduler) unwinds like Ctrl-C: the unfinished bundle is removed.
    _SIGNALLED.clear()
    terminate = signal.signal(signal.SIGTERM, _on_termination)
    try:
        block_size = args.block_size if args.block_size is not None else Int4Options.block_size
        int4 = Int4Options(block_size, not args.asymmetric, args.quantize_lm_head, args.accuracy_level)
        export_bundle(
            args.model, args.output or default_output(args.model), args.precision, args.revision, not args.no_validate,
            args.decoder, args.target or "cuda", int4, args.kv_cache,
        )
    except (UnsupportedModelError, ExportValidationError, FileNotFoundError) as error:
        stage = failed_stage(error)
        print(f"ortllava-export: error: {f'{stage} failed: ' if stage else ''}{error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. the disk filled up (the unfinished bundle is removed)
        print(f"ortllava-export: error: {failed_stage(error) or 'writing the bundle'} failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ortllava-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    except SystemExit as refusal:  # the option checks' refusals (a message; argparse's own exit has a number)
        if not isinstance(refusal.code, str):
            raise
        print(f"ortllava-export: error: {refusal.code}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, terminate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
