"""Image features -> the decoder's input embeddings: pack each image's tiles, splice them into the text.

Terms (see DESIGN.md):
- pack: per image, the base tile's features, then the grid tiles' features stitched into one feature map,
  unpadded back to the image's aspect ratio, with `image_newline` closing each row. The result has exactly
  `Processor.num_image_tokens(h, w)` rows.
- splice: the packed rows replace, in order, the embeddings of the `<image>` tokens of the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..preprocess.image import grid_shape


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


def _grid(tile_features: np.ndarray, image_size: tuple[int, int], grid_pinpoints: list[list[int]], tile_size: int):
    """One image's grid tiles `[n_tiles, p*p, D]` (base tile first) as `[rows, cols, p, p, D]` (a view), and the
    window of their stitched `[rows*p, cols*p]` feature map that shows the image: (top, left, height, width)."""
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    side = int(round(np.sqrt(tile_features.shape[1])))
    tiles = tile_features[1:].reshape(rows, cols, side, side, tile_features.shape[-1])
    height, width = unpadded_shape(image_size, (rows * side, cols * side))
    return tiles, ((rows * side - height) // 2, (cols * side - width) // 2, height, width)


def packed_length(tile_features: np.ndarray, image_size: tuple[int, int], grid_pinpoints: list[list[int]], tile_size: int) -> int:
    """Rows `pack_image` gives for these tiles: the base tile's, then each grid row's and its newline."""
    if len(tile_features) == 1:
        return tile_features.shape[1] + 1
    _, (_, _, height, width) = _grid(tile_features, image_size, grid_pinpoints, tile_size)
    return tile_features.shape[1] + height * (width + 1)


def pack_image(
    tile_features: np.ndarray,
    image_size: tuple[int, int],
    image_newline: np.ndarray,
    grid_pinpoints: list[list[int]],
    tile_size: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """`[n_tiles, p*p, D]` (base tile first) -> `[n_features, D]` for one image of (height, width).

    Written once, into `out` where given (`[n_features, D]`, e.g. the image's rows of the prompt's embeddings, cast
    to its dtype as they are written), else into a new array in the tiles' dtype (no float32 promotion of fp16).
    """
    base = tile_features[0]
    if out is None:
        out = np.empty((packed_length(tile_features, image_size, grid_pinpoints, tile_size), tile_features.shape[-1]), tile_features.dtype)
    newline = image_newline.astype(out.dtype, copy=False)
    out[: len(base)] = base
    if len(tile_features) == 1:
        out[len(base)] = newline
        return out
    tiles, (top, left, height, width) = _grid(tile_features, image_size, grid_pinpoints, tile_size)
    side = tiles.shape[2]
    rows_view = out[len(base) :].reshape(height, width + 1, out.shape[-1])
    # Feature-map row y is patch row y % p of tile row y // p, across the tiles of that row: copied a tile's patch
    # row at a time, which are contiguous. (Stitching the map as one transposed, reshaped view made numpy copy the
    # whole grid first: 3 ms for one photo's 5 tiles at 4096 wide, fp16.)
    for y in range(height):
        tile_row, patch_row = divmod(top + y, side)
        for column in range(tiles.shape[1]):
            begin, end = max(column * side, left), min((column + 1) * side, left + width)  # the map's columns
            if begin < end:
                rows_view[y, begin - left : end - left] = tiles[tile_row, column, patch_row, begin - column * side : end - column * side]
    rows_view[:, width] = newline
    return out


@dataclass
class ProjectedImages:
    """A prompt's images as the projector leaves them, not yet packed: `embed` packs each straight into its
    `<image>` rows of the embeddings, so the packed features (2160 x 4096 fp16 for one photo on a 7B model) are
    written once, not packed into an array of their own first and then copied."""

    tiles: np.ndarray  # [sum(tiles_per_image), p*p, D]: every image's tiles, base tile first, image after image
    image_sizes: list[tuple[int, int]]  # each image's (height, width)
    tiles_per_image: list[int]
    image_newline: np.ndarray  # [D]
    grid_pinpoints: list[list[int]]
    tile_size: int

    def images(self) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        """Each image's tiles `[n_tiles, p*p, D]` and (height, width)."""
        start = 0
        for size, count in zip(self.image_sizes, self.tiles_per_image):
            yield self.tiles[start : start + count], size
            start += count

    def lengths(self) -> list[int]:
        """Each image's packed rows (its `<image>` tokens)."""
        return [packed_length(tiles, size, self.grid_pinpoints, self.tile_size) for tiles, size in self.images()]

    def pack(self) -> np.ndarray:
        """Packed features `[sum(n_features), D]`, image after image."""
        lengths = self.lengths()
        out = np.empty((sum(lengths), self.tiles.shape[-1]), self.tiles.dtype)
        start = 0
        for (tiles, size), length in zip(self.images(), lengths):
            pack_image(tiles, size, self.image_newline, self.grid_pinpoints, self.tile_size, out[start : start + length])
            start += length
        return out


def embed(
    input_ids: np.ndarray,
    embed_table: np.ndarray,
    image_token_id: int,
    image_features: np.ndarray | ProjectedImages | None = None,
    dtype=None,
) -> np.ndarray:
    """`input_ids [B, T]` -> `inputs_embeds [B, T, D]` (in `dtype`, default the table's), image tokens replaced
    in order by `image_features`: packed `[N, D]`, or `ProjectedImages`, packed straight into their rows. Each row
    of the output is written once."""
    is_image = (input_ids == image_token_id).reshape(-1)
    n_image_tokens = int(is_image.sum())
    lengths = image_features.lengths() if isinstance(image_features, ProjectedImages) else None
    n_features = 0 if image_features is None else sum(lengths) if lengths is not None else len(image_features)
    _check_feature_count(n_image_tokens, n_features)
    out = np.empty((*input_ids.shape, embed_table.shape[1]), dtype or embed_table.dtype)
    flat = out.reshape(-1, embed_table.shape[1])
    if not n_image_tokens:
        flat[:] = np.take(embed_table, input_ids.reshape(-1), axis=0)
        return out
    text = np.flatnonzero(~is_image)
    flat[text] = np.take(embed_table, input_ids.reshape(-1)[text], axis=0)
    if lengths is None:
        flat[is_image] = image_features
        return out
    positions = np.flatnonzero(is_image)
    starts = np.cumsum([0, *lengths[:-1]])
    if all(positions[start + length - 1] - positions[start] == length - 1 for start, length in zip(starts, lengths)):
        for (tiles, size), start, length in zip(image_features.images(), starts, lengths):  # each image's tokens in a row
            first = positions[start]
            pack_image(tiles, size, image_features.image_newline, image_features.grid_pinpoints, image_features.tile_size, flat[first : first + length])
    else:  # (an image's tokens split by text: only input ids written by hand do that)
        flat[is_image] = image_features.pack()
    return out


def splice_index(
    input_ids: np.ndarray, image_token_id: int, image_sizes: list[tuple[int, int]], tiles_per_image: list[int], patches: int,
    grid_pinpoints: list[list[int]], tile_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`embed` as an index, for the bundle's `feature_splice` graph (the features stay on the device): where each
    embedding of `input_ids [B, T]` comes from among the rows [image newline, the text tokens' embeddings in order,
    every tile's `patches` features flattened (`[sum(tiles_per_image) * patches]`, base tile first, image after
    image)]. The image rows are `pack_image`'s own, applied to the rows' indices, so the gather gives the host path's
    embeddings exactly. -> (index `[B, T]` int64, the text tokens' ids `[n_text]`)."""
    flat = input_ids.reshape(-1)
    is_image = flat == image_token_id
    text_ids = flat[~is_image]
    first_tile_row = 1 + len(text_ids)
    rows = np.arange(first_tile_row, first_tile_row + sum(tiles_per_image) * patches, dtype=np.int64).reshape(-1, patches, 1)
    packed = ProjectedImages(rows, image_sizes, tiles_per_image, np.zeros(1, np.int64), grid_pinpoints, tile_size).pack()
    _check_feature_count(int(is_image.sum()), len(packed))
    index = np.empty(len(flat), np.int64)
    index[~is_image] = np.arange(1, first_tile_row)
    index[is_image] = packed[:, 0]
    return index.reshape(input_ids.shape), text_ids


def _check_feature_count(image_tokens: int, features: int) -> None:
    """A ValueError where the prompt's `<image>` tokens and its images' packed features differ in number."""
    if image_tokens != features:
        raise ValueError(f"the prompt has {image_tokens} image tokens but the images gave {features} features")
