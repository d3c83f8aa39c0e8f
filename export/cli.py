"""`ortllava-export`: a LLaVA-NeXT checkpoint -> a bundle folder, stage by stage, with progress."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint

DEFAULT_HOME = Path("models") / "bundles"
STAGES = 6


@contextmanager
def stage(index: int, text: str):
    print(f"[{index}/{STAGES}] {text} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[{index}/{STAGES}] {text}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def default_output(model: str) -> Path:
    return DEFAULT_HOME / re.sub(r"[^A-Za-z0-9._-]+", "--", model.rstrip("/").split("/")[-1] if Path(model).exists() else model)


PRECISIONS = ("fp32", "fp16")
DECODER_KINDS = ("gqa", "concat")


def export_bundle(
    model: str | Checkpoint, output: Path, precision: str = "fp32", revision: str | None = None, validate: bool = True, decoder: str = "gqa",
) -> Path:
    """Exports `model` (hub id, folder, "tiny", or a loaded `Checkpoint`) into the bundle folder `output`; returns it.

    `decoder`: "gqa" (fused attention over a shared, preallocated key/value buffer; the fast path) or
    "concat" (plain ONNX ops, present = past ++ new; the portable fallback, fp32 only).
    """
    import numpy as np

    from .bundle import build_manifest, write_assets, write_manifest
    from .convert import convert_to_fp16, export_decoder, export_projector, export_vision_encoder
    from .fused_decoder import build_fused_decoder
    from .validate import validate_decoder, validate_fused_decoder, validate_vision

    if precision not in PRECISIONS:
        raise SystemExit(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if decoder not in DECODER_KINDS:
        raise SystemExit(f"--decoder {decoder}: choose one of {', '.join(DECODER_KINDS)}")
    if decoder == "concat" and precision != "fp32":
        raise SystemExit("--decoder concat is the portable fp32 fallback; use --decoder gqa for fp16")
    dtype = np.float16 if precision == "fp16" else np.float32
    total = time.perf_counter()
    with stage(1, f"Loading checkpoint {getattr(model, 'source', model)}"):
        checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model, revision)
    # Write into a scratch folder beside the target, then move it in place: a failed export leaves no half bundle.
    output = Path(output)
    work = output.with_name(output.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    graphs = {}
    with stage(2, f"Exporting vision encoder and projector ({precision})"):
        graphs["vision_encoder"] = export_vision_encoder(checkpoint.model, work / "vision_encoder.onnx")
        graphs["projector"] = export_projector(checkpoint.model, work / "projector.onnx")
        if precision == "fp16":
            for name in ("vision_encoder", "projector"):
                convert_to_fp16(graphs[name], work)
    with stage(3, f"Building the {decoder} decoder ({precision})"):
        if decoder == "gqa":
            graphs["decoder"] = build_fused_decoder(checkpoint.model, work / "decoder.onnx", precision)
        else:
            graphs["decoder"] = export_decoder(checkpoint.model, work / "decoder.onnx")
    validation = {}
    if validate:
        with stage(4, "Validating graphs against PyTorch on untraced shapes"):
            validation.update(validate_vision(checkpoint.model, work / "vision_encoder.onnx", work / "projector.onnx", dtype))
            if decoder == "gqa":
                validation.update(validate_fused_decoder(checkpoint.model, work / "decoder.onnx", dtype))
            else:
                validation.update(validate_decoder(checkpoint.model, work / "decoder.onnx"))
            print("      max |onnx - torch|: " + ", ".join(f"{k} {v:.2e}" for k, v in validation.items()), file=sys.stderr)
    with stage(5, "Writing embeddings, tokenizer, chat template and configs"):
        write_assets(checkpoint, work)
    with stage(6, "Hashing files and writing the manifest"):
        write_manifest(build_manifest(checkpoint, graphs, work, precision, validation), work)
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
    parser.add_argument("--no-validate", action="store_true", help="skip the ONNX-vs-PyTorch check (not recommended)")
    args = parser.parse_args(argv)
    from .families import UnsupportedModelError
    from .validate import ExportValidationError

    try:
        export_bundle(args.model, args.output or default_output(args.model), args.precision, args.revision, not args.no_validate, args.decoder)
    except (UnsupportedModelError, ExportValidationError, FileNotFoundError) as error:
        print(f"ortllava-export: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
