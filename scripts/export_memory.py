"""Peak host memory of `ortllava-export` on a ~1B-parameter random checkpoint, per precision.

Builds the checkpoint once (saved in fp16, as the llava-hf checkpoints are published), then exports it in
a fresh process per precision and samples that process's memory from /proc every 20 ms: peak RSS, and peak
anonymous RSS (RSS less the file pages mapped from the checkpoint and bundle, which the kernel can drop).
Prints a table relative to the model's fp16 size and writes JSON.

    python scripts/export_memory.py --work /tmp/export-memory [--json results.json] [--runs fp32 "concat int4"] [--validate]

Without `--validate` the exports skip the PyTorch checks and the accuracy report (`--no-validate`); with it
they run them: PyTorch first (the references, computed in fp32 from the weights as stored), then, with its
weights let go, the bundle's sessions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ~1.03B parameters: a Mistral-style decoder 20 x 2048 (FFN 5632, 32 heads, 8 KV heads, 32k vocab) and a
# small CLIP-style tower.
TEXT = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=32000)
RUNS = {
    "fp32": ["--precision", "fp32"],
    "fp16": ["--precision", "fp16"],
    "int4 (cuda)": ["--precision", "int4", "--target", "cuda"],
    "int4 (cpu)": ["--precision", "int4", "--target", "cpu"],
    "concat fp32": ["--decoder", "concat", "--precision", "fp32"],
    "concat int4": ["--decoder", "concat", "--precision", "int4"],
}


def build(folder: Path) -> int:
    import torch
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    from ortllava_export.tiny import CLIP_PINPOINTS, TinySpec, build_processor, build_tokenizer

    tokenizer = build_tokenizer("mistral")
    text = MistralConfig(**TEXT, max_position_embeddings=4096, sliding_window=None, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, image_size=336, patch_size=14)
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=CLIP_PINPOINTS, image_seq_length=576)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.half().save_pretrained(folder)
    build_processor(TinySpec(family="mistral"), tokenizer).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _status(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def peak_memory_of(command: list[str]) -> tuple[dict[str, int], float, int]:
    """Runs `command`; returns ({VmRSS, RssAnon, RssFile: peak bytes}, seconds, exit status)."""
    start = time.perf_counter()
    # stderr to a file: a pipe read only at the end fills up and stops the export (onnxruntime's quantizer logs a lot)
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while process.poll() is None:
        try:
            for key, value in _status(process.pid).items():
                peaks[key] = max(peaks[key], value)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    process.wait()
    if process.returncode:
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
    log.close()
    return peaks, time.perf_counter() - start, process.returncode


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/export-memory"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--validate", action="store_true", help="export with validation and the accuracy report (the default of ortllava-export)")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which exports to measure (default: all)")
    args = parser.parse_args()
    checkpoint = args.work / "checkpoint"
    count_file = args.work / "parameters.json"
    if not count_file.is_file():
        print("building the ~1B checkpoint ...", file=sys.stderr, flush=True)
        count_file.write_text(json.dumps(build(checkpoint)))
    parameters = json.loads(count_file.read_text())
    fp16_bytes = 2 * parameters
    results = {"parameters": parameters, "fp16_bytes": fp16_bytes, "validate": args.validate, "runs": {}}
    print(f"{parameters / 1e9:.2f}B parameters, fp16 size {fp16_bytes / 2**30:.2f} GiB")
    print(f"{'precision':14}{'peak RSS GiB':>14}{'x fp16':>8}{'peak anon GiB':>15}{'x fp16':>8}{'time s':>8}{'bundle GiB':>12}")
    for name in args.runs:
        flags = RUNS[name]
        output = args.work / name.replace(" ", "-").replace("(", "").replace(")", "")
        command = [sys.executable, "-m", "ortllava_export.cli", "--model", str(checkpoint), "--output", str(output), *flags]
        command += [] if args.validate else ["--no-validate"]
        peaks, seconds, status = peak_memory_of(command)
        size = sum(f.stat().st_size for f in output.iterdir()) if status == 0 else 0
        rss, anon = peaks["VmRSS"], peaks["RssAnon"]
        results["runs"][name] = {
            "peak_rss_bytes": rss, "peak_anon_bytes": anon, "rss_to_fp16": rss / fp16_bytes, "anon_to_fp16": anon / fp16_bytes,
            "seconds": seconds, "bundle_bytes": size, "status": status,
        }
        print(f"{name:14}{rss / 2**30:14.2f}{rss / fp16_bytes:8.2f}{anon / 2**30:15.2f}{anon / fp16_bytes:8.2f}{seconds:8.0f}{size / 2**30:12.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
