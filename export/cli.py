"""`ortllava-export`: a LLaVA-NeXT checkpoint -> a bundle folder, stage by stage, with progress."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ortllava.settings import unsupported_generation_settings
from ortllava.manifest import MANIFEST_FILE

from .bundle import SCRATCH_MARK
from .checkpoint import Checkpoint, computing_in_fp32, load_checkpoint
from .quantize import Int4Options

DEFAULT_HOME = Path("models") / "bundles"


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


def default_output(model: str) -> Path:
    """`models/bundles/<name>`: a local folder's own name (resolved, so `.`, `..` and `~/ckpt` name the folder),
    else the hub id with its `/` made `--`."""
    name = model
    if model != "tiny":  # (the built-in model, even where a folder of that name exists: see load_checkpoint)
        local = Path(os.path.expanduser(model))
        if local.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model:
            name = local.resolve().name or "bundle"
    return DEFAULT_HOME / re.sub(r"[^A-Za-z0-9._-]+", "--", name)


PRECISIONS = ("fp32", "fp16", "int4")
DECODER_KINDS = ("gqa", "concat")
TARGETS = ("cuda", "cpu")


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What an export writes, resolved from the options before anything heavy runs."""

    precision: str  # fp32, fp16, int4
    decoder: str  # gqa, concat
    target: str  # int4: cuda (fp16 activations and vision) or cpu (fp32)
    validate: bool
    int4: Int4Options | None  # int4 only
    kv_cache: str  # float or int8 ("auto" resolved)

    @property
    def half(self) -> bool:
        """fp16 activations, vision encoder and projector."""
        return self.precision == "fp16" or (self.precision == "int4" and self.target == "cuda")

    @property
    def decoder_precision(self) -> str:
        return "fp16" if self.half and self.decoder == "gqa" else "fp32"

    @property
    def quantized(self) -> bool:
        """The shipped decoder is quantized (4-bit weights, an int8 cache, or both); with validation, the float
        graph is built (and validated) too."""
        return self.precision == "int4" or self.kv_cache == "int8"


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
    from .fused_decoder import unsupported_features

    plan = plan_export(precision, decoder, target, validate, int4, kv_cache)
    output = Path(os.path.abspath(output))
    check_output(output)
    total = time.perf_counter()

    def check_config(config) -> None:  # before the weights load: refuse what the fused graph does not implement
        if decoder == "gqa" and (missing := unsupported_features(config)):
            raise UnsupportedModelError(f"the fused decoder does not implement this checkpoint's {'; '.join(missing)}: export it with --decoder concat")

    # Write into a scratch folder beside the target, then move it in place: a failed export leaves no half bundle.
    # Made first, so an output that cannot be written is found before the checkpoint loads.
    work = output.with_name(output.name + ".partial")
    created = [parent for parent in output.parents if not parent.exists()]  # nearest first
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with _export_lock(output):  # one export at a time per --output: each would clear the other's scratch folder
            check_output(output)  # again, now that no other export can change it
            _clear_scratch(work)
            work.mkdir()
            (work / SCRATCH_MARK).touch()
            try:
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
                (work / SCRATCH_MARK).unlink()
                _move_into_place(work, output)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
    except BaseException:
        for parent in created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    print(f"Bundle written to {output} in {time.perf_counter() - total:.1f} s", file=sys.stderr)
    return output


@contextmanager
def _export_lock(output: Path):
    """Holds an exclusive lock on `DIR.lock` beside `output` for the block, and removes the file after; a second
    export to the same `output` is refused (SystemExit) rather than deleting the first one's scratch folder.

    `fcntl.flock` (Linux, macOS): the lock goes with the process, so a killed export leaves no stale lock, only the
    empty file, which the next export takes over. Where there is no fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = output.with_name(output.name + ".lock")
    if lock.is_symlink() or lock.exists() and not (lock.is_file() and lock.stat().st_size == 0):
        raise SystemExit(f"{lock} exists and is not an export's lock (an empty file); move it away (the export uses that name)")
    for _ in range(3):
        handle = open(lock, "a")  # (never truncated: a file another export holds stays as it is)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SystemExit(f"another export is writing {output} (it holds {lock}); wait for it to finish, or choose another --output") from None
        # The export that held it may have removed the file between our open and our lock: then this lock is on a
        # file no one else will see, and a third export could lock a new one. Only a lock on the file at `lock` counts.
        try:
            held = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
        except FileNotFoundError:
            held = False
        if held:
            break
        handle.close()
    else:
        raise SystemExit(f"another export is writing {output} (its lock {lock} keeps changing); try again")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the lock is released: a waiting export then finds no file, or its own
        handle.close()


def _clear_scratch(work: Path) -> None:
    """Removes what an interrupted export left at `work` (the scratch folder's name); a folder of that name
    that is not such a leftover is refused, not deleted."""
    if not work.exists():
        return
    if work.is_dir() and not work.is_symlink() and ((work / SCRATCH_MARK).is_file() or not any(work.iterdir())):
        shutil.rmtree(work)
        return
    raise SystemExit(f"{work} exists and is not left over from an ortllava export; move it away (the export writes there first)")


def _move_into_place(work: Path, output: Path) -> None:
    """Puts the finished bundle `work` at `output`; an earlier bundle there is set aside first and restored if the
    move fails, then deleted."""
    earlier = None
    if output.exists():
        earlier = output.with_name(output.name + ".earlier")
        shutil.rmtree(earlier, ignore_errors=True)
        output.rename(earlier)
    try:
        work.rename(output)
    except BaseException:
        if earlier is not None:
            earlier.rename(output)
        raise
    if earlier is not None:
        shutil.rmtree(earlier)


def plan_export(precision: str, decoder: str, target: str, validate: bool, int4: Int4Options | None, kv_cache: str) -> ExportPlan:
    """The options checked and resolved; a combination that cannot work stops here (SystemExit naming it)."""
    from .kv_cache import KV_CACHE_TYPES, resolve_kv_cache

    if precision not in PRECISIONS:
        raise SystemExit(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if decoder not in DECODER_KINDS:
        raise SystemExit(f"--decoder {decoder}: choose one of {', '.join(DECODER_KINDS)}")
    if target not in TARGETS:
        raise SystemExit(f"--target {target}: choose one of {', '.join(TARGETS)}")
    if decoder == "concat" and precision == "fp16":
        raise SystemExit("--decoder concat has fp32 activations (fp32 or int4 weights); use --decoder gqa for fp16")
    if kv_cache not in KV_CACHE_TYPES:
        raise SystemExit(f"--kv-cache {kv_cache}: choose one of {', '.join(KV_CACHE_TYPES)}")
    if precision == "int4":
        int4 = int4 or Int4Options()
        if int4.block_size not in (16, 32, 64, 128, 256):
            raise SystemExit(f"--block-size {int4.block_size}: onnxruntime's MatMulNBits takes 16, 32, 64, 128 or 256")
        if decoder == "concat" and int4.quantize_lm_head:
            raise SystemExit("--quantize-lm-head needs --decoder gqa (the concat graph's lm_head is a Gemm the quantizer leaves as it is)")
        if int4.accuracy_level is None and (target == "cpu" or decoder == "concat"):
            # fp32 activations on the CPU: MLAS's fast 4-bit kernels quantize each activation block to int8.
            int4 = dataclasses.replace(int4, accuracy_level=4)
    else:
        int4 = None
    plan = ExportPlan(precision, decoder, target, validate, int4, kv_cache)
    if int4 is not None and plan.decoder_precision == "fp16" and int4.accuracy_level == 4:
        # onnxruntime 1.32's CPU MatMulNBits at level 4 with fp16 activations gave logits off by 2-3.5 in a session
        # without graph optimizations (prepack=False, and the accuracy report's), right with them; its CUDA kernel
        # reads no accuracy level at all. So the option could only do harm here.
        raise SystemExit(
            "--accuracy-level 4 (int8 compute) is for fp32 activations: use --target cpu for it; with --target cuda's fp16 "
            "activations the CUDA kernel ignores it, and onnxruntime's CPU kernel gives wrong logits in unoptimized sessions"
        )
    plan = dataclasses.replace(plan, kv_cache=resolve_kv_cache(kv_cache, precision, decoder, plan.half))
    if plan.kv_cache == "int8" and (decoder != "gqa" or plan.half):
        raise SystemExit(
            "--kv-cache int8 needs the gqa decoder with fp32 activations (fp32, or int4 --target cpu): the int8 cache "
            "is verified on the CPU provider only"
        )
    return plan


def check_output(output: Path) -> None:
    """Refuses an `--output` (absolute) that is neither new, nor an empty folder, nor an earlier bundle with nothing
    else in it (which is replaced): a mistyped path must not delete someone's folder, nor a bundle folder the files
    someone put beside the bundle."""
    if output.is_symlink():
        raise SystemExit(f"--output {output} is a symbolic link; name the folder itself")
    if output == Path.cwd() or output in Path.cwd().parents:
        raise SystemExit(f"--output {output} holds the current folder; name a new folder")
    if not output.exists():
        return
    if not output.is_dir():
        raise SystemExit(f"--output {output} is a file, not a folder")
    if any(output.iterdir()):
        own = _bundle_entries(output)
        if own is None:
            raise SystemExit(f"--output {output} is a folder that holds other things than a bundle; name a new or empty folder")
        if foreign := _foreign_entries(output, own):
            raise SystemExit(
                f"--output {output} holds an earlier bundle, and also {_list(foreign)}, which the bundle does not list: replacing "
                "the bundle would delete them; move them away, or name a new or empty folder"
            )
    earlier = output.with_name(output.name + ".earlier")  # where the earlier bundle is set aside while the new one moves in
    if earlier.exists():
        own = _bundle_entries(earlier) if earlier.is_dir() and not earlier.is_symlink() else None
        if own is None or _foreign_entries(earlier, own):
            raise SystemExit(f"{earlier} exists and is not a bundle set aside by an export; move it away (the export uses that name)")


def _bundle_entries(folder: Path) -> set[str] | None:
    """The names in `folder` that belong to the ortllava bundle it holds (of any schema version: an older bundle
    may be replaced): manifest.json and the files its manifest lists (every hashed file, each graph and its
    external data). None when `folder` holds no bundle's manifest."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and {"schema_version", "graphs", "files"} <= set(data)):
        return None
    listed = list(data["files"]) if isinstance(data["files"], (dict, list)) else []
    for graph in data["graphs"].values() if isinstance(data["graphs"], dict) else []:
        if isinstance(graph, dict):
            listed += [graph.get("file"), *(graph.get("external_data") or [])]
    # A listed file's first path part is the entry in `folder` (the manifest lists plain names; a path is kept whole).
    return {MANIFEST_FILE} | {Path(name).parts[0] for name in listed if isinstance(name, str) and name and Path(name).parts}


# What file browsers leave in any folder they show: not someone's work, so no reason to keep a bundle in place.
OS_CLUTTER = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _foreign_entries(folder: Path, own: set[str]) -> list[str]:
    """The entries of `folder` that are not in `own` (its bundle's) nor OS clutter, sorted; folders with a trailing
    slash."""
    return sorted(entry.name + "/" * entry.is_dir() for entry in folder.iterdir() if entry.name not in own | OS_CLUTTER)


def _list(names: list[str], most: int = 5) -> str:
    """`a, b/ and c`: the first `most` of `names`, and how many more."""
    shown = names[:most] + ([f"{len(names) - most} more"] if len(names) > most else [])
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


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

    from .accuracy import accuracy_references, accuracy_report
    from .bundle import build_manifest, write_assets, write_manifest
    from .convert import convert_to_fp16, export_decoder, export_projector, export_vision_encoder
    from .fused_decoder import build_fused_decoder
    from .kv_cache import calibrate_kv_scales
    from .quantize import quantize_decoder
    from .validate import check, references

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
        settings = ", ".join(f"{key}={value!r}" for key, value in ignored.items())
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
    with stage("Hashing files and writing the manifest"):
        manifest = build_manifest(checkpoint, graphs, work, plan.precision, validation)
        write_manifest(manifest, work)
    if plan.validate:
        with stage("Measuring accuracy against the fp32 PyTorch model (teacher-forced)"):
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
    missing = missing_dependencies()
    if missing:
        print(f"ortllava-export: error: needs {' and '.join(missing)}: pip install 'ortllava[export]' (torch: its CPU build is enough)", file=sys.stderr)
        return 1
    from .families import UnsupportedModelError
    from .validate import ExportValidationError

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
