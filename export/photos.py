"""Photo-like synthetic images for the exporter's own measurements: the accuracy report, the int8 cache's
calibration, the benchmark and the GPU check (smooth colour gradients plus noise; fixed by the seed)."""

from __future__ import annotations

import numpy as np


def photo(width: int, height: int, seed: int = 0):
    """A `width` x `height` RGB PIL image: horizontal, vertical and diagonal gradients plus uniform noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), ((xx * 2 + yy) * 3) % 256], -1)
    return Image.fromarray(np.clip(base + rng.integers(0, 48, (height, width, 3)), 0, 255).astype(np.uint8))
