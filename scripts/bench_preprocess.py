#!/usr/bin/env python
"""Anyres image preprocessing: ortllava's `ImageProcessor` against transformers' `LlavaNextImageProcessorPil`.

For each image size it reports
- first call: the first preprocessing call in a fresh Python process (cold PIL/numpy paths, fresh memory),
  median over `--first-runs` processes per implementation. Every child process imports both libraries and
  builds both processors and the image, then times one call of one implementation; the order in which the
  children are started alternates (ours, hf, hf, ours, ...);
- steady state: the median of `--repeat` calls in this process after a warmup, the two implementations
  alternating call by call (and swapping who goes first every round), with the garbage collector off for both;
- ratio: ours / transformers (the speed issue asks for <= 0.5 on the 600x400 case);
- bit-exact: whether `pixel_values` and `image_sizes` are identical (np.array_equal).

Thread pools: numpy's BLAS/OpenMP pools are pinned to `--threads` (default 1) in this process and in the
children, before numpy is imported; neither implementation uses them for this work, but the setting is the
same for both. Both run in the same process, on the same image object, with the same configuration.

Usage: python scripts/bench_preprocess.py [--sizes 600x400,336x336,1024x768,2000x1500] [--repeat 50]
       [--first-runs 5] [--image photo.jpg]
Needs transformers (the dev environment); the runtime itself does not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")

# llava-hf/llava-v1.6-* preprocessor_config.json
CONFIG = {
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "size": {"shortest_edge": 336},
    "crop_size": {"height": 336, "width": 336},
}
DEFAULT_SIZES = "600x400,336x336,1024x768,300x800,2000x1500"


def _pin_threads(threads: int) -> None:
    for name in THREAD_VARS:
        os.environ[name] = str(threads)


def photo(width: int, height: int, path: str | None = None, seed: int = 0):
    """A photo-like RGB image: `path` resized to width x height, or smooth colour fields with fine grain."""
    import numpy as np
    from PIL import Image

    if path:
        return Image.open(path).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    yy, xx = np.mgrid[0:height, 0:width]
    edges = 40.0 * np.sin(xx / 23.0)[..., None] * np.cos(yy / 31.0)[..., None]
    grain = rng.normal(0.0, 6.0, (height, width, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + edges + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def processors():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ortllava.preprocess.image import ImageProcessor, ImageProcessorConfig

    hf = LlavaNextImageProcessorPil(**CONFIG)
    ours = ImageProcessor(ImageProcessorConfig.from_dict(hf.to_dict()))
    return {"ours": lambda images: ours(images), "hf": lambda images: hf(images, return_tensors="np")}


def parse_size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def child(which: str, size: str, image_path: str | None) -> None:
    """One fresh process: set up both implementations, then time the first call of `which`."""
    width, height = parse_size(size)
    funcs = processors()
    image = photo(width, height, image_path)
    start = time.perf_counter()
    funcs[which]([image])
    print(f"{(time.perf_counter() - start) * 1e3:.4f}")


def first_call_ms(which: str, size: str, image_path: str | None) -> float:
    command = [sys.executable, os.path.abspath(__file__), "--child", which, "--sizes", size]
    if image_path:
        command += ["--image", image_path]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ.copy())
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated WIDTHxHEIGHT list")
    parser.add_argument("--repeat", type=int, default=50, help="steady-state calls per implementation and size")
    parser.add_argument("--first-runs", type=int, default=5, help="fresh processes per implementation and size")
    parser.add_argument("--threads", type=int, default=1, help="numpy/BLAS/OpenMP thread pools (both sides)")
    parser.add_argument("--image", help="a photo to resize to each size (default: a synthetic photo-like image)")
    parser.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    _pin_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if args.child:
        child(args.child, args.sizes, args.image)
        return

    import gc
    import platform

    import numpy as np
    import PIL

    funcs = processors()
    sizes = args.sizes.split(",")
    print(f"python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}, "
          f"{os.cpu_count()} CPUs, thread pools pinned to {args.threads}; "
          f"first call: median of {args.first_runs} fresh processes each; steady: median of {args.repeat} calls, alternating")
    header = (f"{'size (WxH)':>11} {'tiles':>5} | {'first ours':>10} {'first hf':>9} {'ratio':>6} | "
              f"{'median ours':>11} {'median hf':>9} {'ratio':>6} | bit-exact")
    print(header)
    print("-" * len(header))
    for size in sizes:
        width, height = parse_size(size)
        image = photo(width, height, args.image)

        ours_out, hf_out = funcs["ours"]([image]), funcs["hf"]([image])
        exact = np.array_equal(ours_out["pixel_values"], hf_out["pixel_values"]) and np.array_equal(
            ours_out["image_sizes"], hf_out["image_sizes"]
        )
        tiles = ours_out["pixel_values"].shape[1]

        first = {"ours": [], "hf": []}
        for run in range(args.first_runs):
            order = ("ours", "hf") if run % 2 == 0 else ("hf", "ours")
            for which in order:
                first[which].append(first_call_ms(which, size, args.image))

        for _ in range(3):  # warmup
            for which in ("ours", "hf"):
                funcs[which]([image])
        steady = {"ours": [], "hf": []}
        gc.collect()
        gc.disable()
        try:
            for run in range(args.repeat):
                order = ("ours", "hf") if run % 2 == 0 else ("hf", "ours")
                for which in order:
                    start = time.perf_counter()
                    funcs[which]([image])
                    steady[which].append((time.perf_counter() - start) * 1e3)
        finally:
            gc.enable()

        f_ours, f_hf = np.median(first["ours"]), np.median(first["hf"])
        s_ours, s_hf = np.median(steady["ours"]), np.median(steady["hf"])
        print(f"{size:>11} {tiles:>5} | {f_ours:8.2f}ms {f_hf:7.2f}ms {f_ours / f_hf:6.2f} | "
              f"{s_ours:9.2f}ms {s_hf:7.2f}ms {s_ours / s_hf:6.2f} | {'yes' if exact else 'NO'}")


if __name__ == "__main__":
    main()
