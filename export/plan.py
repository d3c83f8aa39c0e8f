"""An export's options, checked and resolved into an `ExportPlan` before anything heavy runs: a combination that
cannot work stops here, naming the options."""

from __future__ import annotations

import dataclasses

from .graphs.quantize import Int4Options

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


def plan_export(precision: str, decoder: str, target: str, validate: bool, int4: Int4Options | None, kv_cache: str) -> ExportPlan:
    """The options checked and resolved; a combination that cannot work stops here (SystemExit naming it)."""
    from .graphs.kv_cache import KV_CACHE_TYPES, resolve_kv_cache

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
