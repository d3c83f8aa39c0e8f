"""Image features -> the decoder's input embeddings: pack each image's tiles, splice them into the text.

Terms (see DESIGN.md):
- pack: per image, the base tile's features, then the grid tiles' features stitched into one feature map,
  unpadded back to the image's aspect ratio, with `image_newline` closing each row. The result has exactly
  `Processor.num_image_tokens(h, w)` rows.
- splice: the packed rows replace, in order, the embeddings of the `<image>` tokens of the prompt.
"""

from __future__ import annotations

import numpy as np

from .image import grid_shape


def unpadded_shape(original_size: tuple[int, int], grid_shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a `grid_shape` feature map that show an image of `original_size` (height, width) once the
    letterbox padding is cut, as transformers' `unpad_image` cuts it (the same on both sides)."""
    original_height, original_width = original_size
    height, width = grid_shape
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        return height - (height - new_height) // 2 * 2, width
    new_width = int(round(original_width * (height / original_height), 7))
    return height, width - (width - new_width) // 2 * 2


def unpad(features: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """`[H, W, D]` grid feature map -> the rows/columns that show the image, not the letterbox padding."""
    height, width = features.shape[:2]
    rows, cols = unpadded_shape(original_size, (height, width))
    top, left = (height - rows) // 2, (width - cols) // 2
    return features[top : top + rows, left : left + cols]


def pack_image(
    tile_features: np.ndarray,
    image_size: tuple[int, int],
    image_newline: np.ndarray,
    grid_pinpoints: list[list[int]],
    tile_size: int,
) -> np.ndarray:
    """`[n_tiles, p*p, D]` (base tile first) -> `[n_features, D]` for one image of (height, width).

    Written once into one output array, in the tiles' dtype (no float32 promotion of fp16 features).
    """
    base = tile_features[0]
    dim = tile_features.shape[-1]
    newline = image_newline.astype(tile_features.dtype, copy=False)
    if len(tile_features) == 1:
        out = np.empty((len(base) + 1, dim), tile_features.dtype)
        out[:-1], out[-1] = base, newline
        return out
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    side = int(round(np.sqrt(tile_features.shape[1])))
    grid = tile_features[1:].reshape(rows, cols, side, side, dim)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)  # a view: no copy yet
    grid = unpad(grid, image_size)
    height, width = grid.shape[:2]
    out = np.empty((len(base) + height * (width + 1), dim), tile_features.dtype)
    out[: len(base)] = base
    rows_view = out[len(base) :].reshape(height, width + 1, dim)
    rows_view[:, :width] = grid  # the one copy of the grid, straight into place
    rows_view[:, width] = newline
    return out


def pack_images(
    projected: np.ndarray,
    image_sizes: np.ndarray,
    tiles_per_image: list[int],
    image_newline: np.ndarray,
    grid_pinpoints: list[list[int]],
    tile_size: int,
) -> np.ndarray:
    """All images' tiles `[sum(tiles_per_image), p*p, D]` -> packed features `[sum(n_features), D]`, image after image."""
    packed = []
    start = 0
    for size, count in zip(image_sizes.tolist(), tiles_per_image):
        packed.append(pack_image(projected[start : start + count], tuple(size), image_newline, grid_pinpoints, tile_size))
        start += count
    return packed[0] if len(packed) == 1 else np.concatenate(packed, axis=0)


def embed(
    input_ids: np.ndarray,
    embed_table: np.ndarray,
    image_token_id: int,
    image_features: np.ndarray | None = None,
    dtype=None,
) -> np.ndarray:
    """`input_ids [B, T]` -> `inputs_embeds [B, T, D]` (in `dtype`, default the table's), image tokens replaced
    in order by `image_features [N, D]`. Each row of the output is written once."""
    is_image = (input_ids == image_token_id).reshape(-1)
    n_image_tokens = int(is_image.sum())
    n_features = 0 if image_features is None else len(image_features)
    if n_image_tokens != n_features:
        raise ValueError(f"the prompt has {n_image_tokens} image tokens but the images gave {n_features} features")
    out = np.empty((*input_ids.shape, embed_table.shape[1]), dtype or embed_table.dtype)
    flat = out.reshape(-1, embed_table.shape[1])
    if not n_image_tokens:
        flat[:] = np.take(embed_table, input_ids.reshape(-1), axis=0)
        return out
    text = np.flatnonzero(~is_image)
    flat[text] = np.take(embed_table, input_ids.reshape(-1)[text], axis=0)
    flat[is_image] = image_features
    return out
