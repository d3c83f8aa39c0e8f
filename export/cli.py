"""`ortllava-export`: a LLaVA-NeXT checkpoint -> a bundle folder, stage by stage, with progress."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint
from .quantize import Int4Options

DEFAULT_HOME = Path("models") / "bundles"


class Progress:
    """Numbered stages on stderr, each with its time: `[3/7] Building the decoder: done in 2.1 s`."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    @contextmanager
    def stage(self, text: str):
        self.index += 1
        print(f"[{self.index}/{self.total}] {text} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        print(f"[{self.index}/{self.total}] {text}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def default_output(model: str) -> Path:
    return DEFAULT_HOME / re.sub(r"[^A-Za-z0-9._-]+", "--", model.rstrip("/").split("/")[-1] if Path(model).exists() else model)


PRECISIONS = ("fp32", "fp16", "int4")
DECODER_KINDS = ("gqa", "concat")
TARGETS = ("cuda", "cpu")


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
    """
    import numpy as np

    from .accuracy import accuracy_report
    from .bundle import build_manifest, write_assets, write_manifest
    from .convert import convert_to_fp16, export_decoder, export_projector, export_vision_encoder
    from .fused_decoder import build_fused_decoder
    from .kv_cache import KV_CACHE_TYPES, calibrate_kv_scales, resolve_kv_cache
    from .quantize import quantize_decoder
    from .validate import validate_decoder, validate_fused_decoder, validate_vision

    if precision not in PRECISIONS:
        raise SystemExit(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if decoder not in DECODER_KINDS:
        raise SystemExit(f"--decoder {decoder}: choose one of {', '.join(DECODER_KINDS)}")
    if target not in TARGETS:
        raise SystemExit(f"--target {target}: choose one of {', '.join(TARGETS)}")
    if decoder == "concat" and precision == "fp16":
        raise SystemExit("--decoder concat has fp32 activations (fp32 or int4 weights); use --decoder gqa for fp16")
    half = precision == "fp16" or (precision == "int4" and target == "cuda")
    if kv_cache not in KV_CACHE_TYPES:
        raise SystemExit(f"--kv-cache {kv_cache}: choose one of {', '.join(KV_CACHE_TYPES)}")
    kv_cache = resolve_kv_cache(kv_cache, precision, decoder, half)
    if kv_cache == "int8" and (decoder != "gqa" or half):
        raise SystemExit(
            "--kv-cache int8 needs the gqa decoder with fp32 activations (fp32, or int4 --target cpu): the int8 cache "
            "is verified on the CPU provider only"
        )
    dtype = np.float16 if half else np.float32
    decoder_precision = "fp16" if half and decoder == "gqa" else "fp32"
    total = time.perf_counter()
    quantized = precision == "int4" or kv_cache == "int8"  # built after the float graph is validated
    progress = Progress(5 + 2 * validate + (kv_cache == "int8") + (quantized and (validate or decoder == "concat")))
    stage = progress.stage
    with stage(f"Loading checkpoint {getattr(model, 'source', model)}"):
        # Unvalidated exports keep the decoder as stored (memory-mapped); validation needs the fp32 reference.
        checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model, revision, stored_dtype=not validate)
    # Write into a scratch folder beside the target, then move it in place: a failed export leaves no half bundle.
    output = Path(output)
    work = output.with_name(output.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    graphs = {}
    with stage(f"Exporting vision encoder and projector ({'fp16' if half else 'fp32'})"):
        graphs["vision_encoder"] = export_vision_encoder(checkpoint.model, work / "vision_encoder.onnx")
        graphs["projector"] = export_projector(checkpoint.model, work / "projector.onnx")
        if half:
            for name in ("vision_encoder", "projector"):
                convert_to_fp16(graphs[name], work)
    int4 = (int4 or Int4Options()) if precision == "int4" else None
    if int4 is not None and int4.accuracy_level is None and (target == "cpu" or decoder == "concat"):
        # fp32 activations on the CPU: MLAS's fast 4-bit kernels quantize each activation block to int8.
        int4 = dataclasses.replace(int4, accuracy_level=4)
    kv_scales = None
    if kv_cache == "int8":
        with stage("Calibrating the int8 key/value cache (PyTorch prefills of 3 prompts with images)"):
            kv_scales = calibrate_kv_scales(checkpoint)
    # Unvalidated quantized fused decoders are built quantized at once; otherwise the float graph comes first.
    quantize_at_build = quantized and decoder == "gqa" and not validate
    quantized_parts = ", ".join(
        ([f"weights to 4 bits (block {int4.block_size}, {'symmetric' if int4.symmetric else 'asymmetric'})"] if int4 else [])
        + (["key/value cache to int8"] if kv_scales else [])
    )
    with stage(f"Building the {decoder} decoder ({decoder_precision}{'; ' + quantized_parts if quantize_at_build else ''})"):
        if decoder == "gqa":
            at_build = dict(int4=int4, kv_scales=kv_scales) if quantize_at_build else {}
            graphs["decoder"] = build_fused_decoder(checkpoint.model, work / "decoder.onnx", decoder_precision, **at_build)
        else:
            graphs["decoder"] = export_decoder(checkpoint.model, work / "decoder.onnx")
    validation = {}
    if validate:
        # The float graphs are checked before quantization: that checks the wiring tightly; the accuracy
        # report (stage 7) then measures what 4-bit weights cost.
        with stage("Validating graphs against PyTorch on untraced shapes"):
            validation.update(validate_vision(checkpoint.model, work / "vision_encoder.onnx", work / "projector.onnx", dtype))
            if decoder == "gqa":
                validation.update(validate_fused_decoder(checkpoint.model, work / "decoder.onnx", dtype))
            else:
                validation.update(validate_decoder(checkpoint.model, work / "decoder.onnx"))
            print("      max |onnx - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in validation.items()), file=sys.stderr)
    if quantized and not quantize_at_build:
        with stage(f"Quantizing the decoder: {quantized_parts}"):
            if decoder == "gqa":  # built again, each weight quantized as it is read
                graphs["decoder"] = build_fused_decoder(checkpoint.model, work / "decoder.onnx", decoder_precision, int4, kv_scales)
            else:
                quantize_decoder(graphs["decoder"], work, int4)
    with stage("Writing embeddings, tokenizer, chat template and configs"):
        write_assets(checkpoint, work, np.float16 if decoder_precision == "fp16" else np.float32)
    with stage("Hashing files and writing the manifest"):
        manifest = build_manifest(checkpoint, graphs, work, precision, validation)
        write_manifest(manifest, work)
    if validate:
        with stage("Measuring accuracy against the fp32 PyTorch model (teacher-forced)"):
            manifest.accuracy = accuracy_report(checkpoint, work)
            write_manifest(manifest, work)
            a = manifest.accuracy
            print(f"      top-1 agreement {a['top1_agreement'] * 100:.1f}% over {a['positions']} positions, "
                  f"logit diff max {a['max_abs_logit_diff']:.3g} mean {a['mean_abs_logit_diff']:.3g}", file=sys.stderr)
    if output.exists():
        shutil.rmtree(output)
    work.rename(output)
    print(f"Bundle written to {output} in {time.perf_counter() - total:.1f} s", file=sys.stderr)
    return output


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
    parser.add_argument("--target", default="cuda", choices=TARGETS, help="int4 only: fp16 activations and vision (cuda) or fp32 (cpu)")
    parser.add_argument("--block-size", type=int, default=32, help="int4: input rows per scale (16, 32, 64, 128, 256)")
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
    from .families import UnsupportedModelError
    from .validate import ExportValidationError

    try:
        int4 = Int4Options(args.block_size, not args.asymmetric, args.quantize_lm_head, args.accuracy_level)
        export_bundle(
            args.model, args.output or default_output(args.model), args.precision, args.revision, not args.no_validate,
            args.decoder, args.target, int4, args.kv_cache,
        )
    except (UnsupportedModelError, ExportValidationError, FileNotFoundError) as error:
        print(f"ortllava-export: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
