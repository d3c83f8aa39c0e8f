"""What `ortllava.load(..., prepack=False)` trades on the CPU: load time and the process's own memory against
prompt and decode speed. Each form loads in a fresh process, the two taking turns.

    python scripts/bench_prepack.py BUNDLE [--runs 2] [--threads 2] [--new-tokens 24]

Prints, per load: seconds to load, anonymous memory after the load (what the process holds itself; weights
left memory-mapped count as file pages instead), the prefill of a short text prompt and decode ms/token. The
bundle's files are read once first, so every load finds them in the page cache (a cold first load reads the
disk either way).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


def _anon_mib() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) // 1024 for line in handle if line.startswith("RssAnon"))


def measure(bundle: str, prepack: bool, threads: int, new_tokens: int) -> dict:
    import ortllava

    start = time.perf_counter()
    pipe = ortllava.load(bundle, provider="cpu", threads=threads, verify=False, prepack=prepack)
    load_s, anon = time.perf_counter() - start, _anon_mib()
    runs = [pipe.generate(messages=MESSAGES, max_new_tokens=new_tokens, min_new_tokens=new_tokens).metrics for _ in range(3)]
    prefill = sorted(m.prefill_s * 1000 for m in runs)[1]
    decode = sorted(m.decode_s * 1000 / (m.generated_tokens - 1) for m in runs)[1]
    return {"prepack": prepack, "load_s": load_s, "anon_mib_after_load": anon, "prefill_ms": prefill, "decode_ms_per_token": decode}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("--runs", type=int, default=2, help="loads of each form (fresh processes, taking turns)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens: at least 2 (decode time is measured after the first token)")
    if args.child:
        print(json.dumps(measure(args.bundle, args.child == "on", args.threads, args.new_tokens)))
        return 0
    for file in Path(args.bundle).iterdir():  # into the page cache
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass
    print(f"{'prepack':8}{'load s':>8}{'anon MiB':>10}{'prefill ms':>12}{'decode ms/token':>17}  (median of 3 generations)")
    for _ in range(args.runs):
        for form in ("on", "off"):
            command = [sys.executable, __file__, args.bundle, "--child", form, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{form:8}{r['load_s']:8.1f}{r['anon_mib_after_load']:10d}{r['prefill_ms']:12.0f}{r['decode_ms_per_token']:17.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
