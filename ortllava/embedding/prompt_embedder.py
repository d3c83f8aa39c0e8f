"""Processor outputs -> the decoder's `inputs_embeds`: the token embedding table, and every image's tiles through the
vision path (all tiles in one run), their features packed into the prompt's `<image>` rows (`features.py`).

Two ways, the same bits: on the host (`embed`), or where the features are (`on_device`: the bundle's
`feature_splice` graph gathers the embeddings on the GPU from the projector's output and a few uploaded text rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..bundle.manifest import EMBED_TOKENS_FILE, IMAGE_NEWLINE_FILE, Manifest, read_bundle_file
from ..bundle.sessions import BundleSessions
from ..preprocess.processor import Processor
from .features import ProjectedImages, embed, splice_index

if TYPE_CHECKING:
    import onnxruntime as ort


class PromptEmbedder:
    """A bundle's embedding table `[V, D]` (memory-mapped), its `image_newline [D]`, and its vision sessions."""

    def __init__(self, bundle: Path, manifest: Manifest, processor: Processor, sessions: BundleSessions):
        hidden, vocab = manifest.text.hidden_size, manifest.text.vocab_size
        self.embed_table = read_bundle_file(bundle, EMBED_TOKENS_FILE, lambda path: _array(path, (vocab, hidden), mmap=True))  # [V, D]
        self.image_newline = read_bundle_file(bundle, IMAGE_NEWLINE_FILE, lambda path: _array(path, (hidden,)))  # [D]
        self.image_token_id = manifest.tokens.image_token_id
        self.grid_pinpoints = manifest.vision.grid_pinpoints
        self.tile_size = processor.image_processor.config.tile_size
        self.processor = processor
        self.sessions = sessions

    def tiles(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]], list[int]]:
        """Every image's tiles, all together `[n_tiles, 3, S, S]` (the padding tiles of `pixel_values [n_images,
        max_tiles, 3, S, S]` left out), each image's (height, width) and its number of tiles."""
        counts = self.processor.tile_counts(image_sizes)
        tiles = np.concatenate([pixels[:count] for pixels, count in zip(pixel_values, counts)], axis=0)
        return tiles, [tuple(size) for size in np.asarray(image_sizes).tolist()], counts

    def project_images(self, pixel_values: np.ndarray, image_sizes: np.ndarray) -> ProjectedImages:
        """`pixel_values [n_images, max_tiles, 3, S, S]` -> every tile's projected features `[n_tiles, p*p, D]` (one run),
        with what packing them takes."""
        tiles, sizes, counts = self.tiles(pixel_values, image_sizes)
        return ProjectedImages(self.sessions.vision(tiles), sizes, counts, self.image_newline, self.grid_pinpoints, self.tile_size)

    def embed(self, input_ids: np.ndarray, image_features: np.ndarray | ProjectedImages | None = None) -> np.ndarray:
        """`input_ids [B, T]` -> `inputs_embeds [B, T, D]` in the decoder's dtype, images spliced in (packed features
        `[n_features, D]`, or `project_images`' output, packed as they are written)."""
        return embed(input_ids, self.embed_table, self.image_token_id, image_features, self.sessions.decoder.dtype)

    def on_device(self, input_ids: np.ndarray, pixel_values: np.ndarray, image_sizes: np.ndarray) -> ort.OrtValue:
        """`embed` with the images' features kept on the device (`sessions.splice` loaded): `inputs_embeds [B, T, D]`
        gathered there. For prompts without padding (the decoder takes them as they are)."""
        tiles, sizes, counts = self.tiles(pixel_values, image_sizes)
        projected = self.sessions.vision.on_device(tiles)
        index, text_ids = splice_index(input_ids, self.image_token_id, sizes, counts, projected.shape()[1], self.grid_pinpoints, self.tile_size)
        host_rows = np.empty((1 + len(text_ids), self.embed_table.shape[1]), self.sessions.decoder.dtype)  # newline, then the text's rows
        host_rows[0] = self.image_newline
        host_rows[1:] = self.embed_table[text_ids]
        return self.sessions.splice(projected, host_rows, index)


def _array(path: Path, shape: tuple[int, ...], mmap: bool = False) -> np.ndarray:
    """A `.npy` array of `shape`; a ValueError if it has another."""
    array = np.load(path, mmap_mode="r" if mmap else None)
    if array.shape != shape:
        raise ValueError(f"its shape is {list(array.shape)}; the manifest's model wants {list(shape)}")
    return array
