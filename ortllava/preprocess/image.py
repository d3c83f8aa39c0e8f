"""Anyres image preprocessing: image -> tiles, bit for bit what transformers' `LlavaNextImageProcessorPil` does.

Terms (see DESIGN.md):
- tile: one `image_size` x `image_size` crop fed to the vision encoder (336 px for CLIP-L/336).
- base image: the whole image squashed to one tile; always tile 0 of an image.
- grid: the best `grid_pinpoints` resolution for the image, cut into `rows x cols` tiles.
An image becomes `1 + rows * cols` tiles: `[n_tiles, 3, image_size, image_size]`.
"""

from __future__ import annotations

import math
import numbers
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
from PIL import Image

from .image_source import IMAGE_SOURCES, ImageLike, ImageLoadError, load_image
from .tokenizer import check_return_tensors

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessorConfig:
    """The fields of a Hugging Face `preprocessor_config.json` that LLaVA-NeXT preprocessing reads."""

    grid_pinpoints: list[list[int]]
    size: dict[str, int]  # {"shortest_edge": 336} or {"height": h, "width": w}
    crop_size: dict[str, int]
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    do_pad: bool = True
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageProcessorConfig:
        """The config of a preprocessor config's fields, read as transformers' `LlavaNextImageProcessorPil` reads them: a
        missing key is its default, `size` and `crop_size` may be numbers or (height, width) pairs (`get_size_dict`: one
        number is a shortest edge, a crop's a square), and a flag set to null is false. A value that transformers' processor
        would refuse at its first call, or that would make wrong pixels, is a ValueError naming the key: a null where a step
        needs the value (`image_mean` with `do_normalize`, `rescale_factor` with `do_rescale`, ...; transformers keeps a
        null, it does not take the default), a size of keys ortllava does not implement, a size that is no positive
        number of pixels, an unknown resampling filter."""
        do_resize, do_center_crop = data.get("do_resize", True), data.get("do_center_crop", True)
        do_rescale, do_normalize = data.get("do_rescale", True), data.get("do_normalize", True)
        size = _size_dict("size", data.get("size", {"shortest_edge": 224}), crop=False)
        crop = data.get("crop_size", {"height": 224, "width": 224})
        if crop is None and do_center_crop:
            raise ValueError("crop_size is null, but do_center_crop is set: give {'height': h, 'width': w} (or one number)")
        crop = _size_dict("crop_size", crop, crop=True) if crop is not None else {}  # (without a crop, tiles are `size`'s)
        means = []
        for name, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
            value = data.get(name, default)
            if value is None and do_normalize:
                raise ValueError(f"{name} is null, but do_normalize is set: give one number, or three (one per RGB channel)")
            value = default if value is None or not do_normalize else value  # (unread without do_normalize)
            values = list(value) if isinstance(value, (list, tuple)) else [value] * 3
            if len(values) != 3 or not all(_is_number(v) and math.isfinite(v) for v in values):  # (transformers' normalize: 3)
                shown = values if isinstance(value, (list, tuple)) else value
                raise ValueError(f"{name} must be one number or three (one per RGB channel), got {shown!r}")
            if name == "image_std" and 0 in values:
                raise ValueError(f"image_std must not hold 0 (normalizing divides by it: infinite pixel values), got {values}")
            means.append(tuple(values))
        rescale = data.get("rescale_factor", 1 / 255)
        if rescale is None and do_rescale:
            raise ValueError("rescale_factor is null, but do_rescale is set: give the factor pixels are scaled by (1/255: to 0-1)")
        rescale = 1 / 255 if rescale is None or not do_rescale else rescale  # (unread without do_rescale)
        if not _is_number(rescale) or not math.isfinite(rescale):
            raise ValueError(f"rescale_factor must be a number, got {rescale!r}")
        resample = data.get("resample", Image.Resampling.BICUBIC)
        if resample is None and do_resize:
            raise ValueError("resample is null, but do_resize is set: give one of PIL's resampling filters (3: bicubic)")
        resample = Image.Resampling.BILINEAR if resample is None else resample  # (transformers' resize then takes bilinear)
        if not isinstance(resample, numbers.Integral) or isinstance(resample, bool) or int(resample) not in set(Image.Resampling):
            filters = ", ".join(f"{int(f)}: {f.name.lower()}" for f in Image.Resampling)
            raise ValueError(f"resample must be one of PIL's resampling filters ({filters}), got {resample!r}")
        pinpoints = data.get("image_grid_pinpoints", [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
        if not isinstance(pinpoints, (list, tuple)) or not pinpoints or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_pixels(side) for side in p) for p in pinpoints
        ):
            raise ValueError(f"image_grid_pinpoints must be a non-empty list of [height, width] resolutions, got {pinpoints!r}")
        return cls(
            grid_pinpoints=[[int(side) for side in p] for p in pinpoints],
            size=size,
            crop_size=crop,
            do_resize=do_resize,
            do_center_crop=do_center_crop,
            do_rescale=do_rescale,
            rescale_factor=rescale,
            do_normalize=do_normalize,
            image_mean=means[0],
            image_std=means[1],
            do_convert_rgb=data.get("do_convert_rgb", True),
            do_pad=data.get("do_pad", True),
            resample=int(resample),
        )

    @property
    def base_size(self) -> tuple[int, int]:
        """(height, width) the whole image is squashed to for the base tile."""
        if "height" in self.size and "width" in self.size:
            return self.size["height"], self.size["width"]
        return self.size["shortest_edge"], self.size["shortest_edge"]

    @property
    def tile_size(self) -> int:
        """Side of the square grid tiles the padded image is cut into."""
        if self.crop_size.get("height"):
            return self.crop_size["height"]
        if self.size.get("height"):
            return self.size["height"]
        return self.size["shortest_edge"]


def _size_dict(name: str, size: Any, crop: bool) -> dict[str, int]:
    """A `size` (`crop=False`) or `crop_size` as transformers' `get_size_dict` reads it: one number is a shortest edge
    (a crop's: a square), a pair (height, width), a dict's keys set to null are left out. A ValueError naming `name`
    for a null, for keys other than the ones ortllava implements ({"shortest_edge"} or {"height", "width"}; a crop's:
    {"height", "width"}), and for a side that is no positive number of pixels."""
    forms = "{'height': h, 'width': w} (or one number)" if crop else "{'shortest_edge': n} or {'height': h, 'width': w}"
    if size is None:
        raise ValueError(f"{name} is null: give {forms}")
    if _is_number(size):
        size = {"height": size, "width": size} if crop else {"shortest_edge": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    elif hasattr(size, "items"):  # (a dict; transformers' SizeDict too)
        size = {key: value for key, value in size.items() if value is not None}
    else:
        raise ValueError(f"{name} must be {forms}, got {size!r}")
    if set(size) not in ([{"height", "width"}] if crop else [{"shortest_edge"}, {"height", "width"}]):
        raise ValueError(f"{name} must be {forms}: the forms ortllava implements, got {size!r}")
    for key, value in size.items():
        if not _is_pixels(value):
            raise ValueError(f"{name}'s {key} must be a positive whole number of pixels, got {value!r}")
    return {key: int(value) for key, value in size.items()}


def _is_number(value: Any) -> bool:
    """Whether `value` is a real number, numpy's too (a bool is not, though Python counts it as one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_pixels(value: Any) -> bool:
    """Whether `value` is a positive whole number of pixels."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """-> `[H, W, 3]` uint8 (or the array's own dtype), transparency composited onto white.

    Mirrors transformers' `convert_to_rgb(..., return_numpy=True)` for PIL images and channels-last or
    channels-first arrays with 1, 3 or 4 channels.
    """
    if isinstance(image, Image.Image):
        return np.array(_rgb_pil(image))
    array = np.asarray(image)
    if array.ndim == 2:  # grayscale [H, W] (never read as channels first, whatever H is)
        return np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3:
        raise ImageLoadError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    array = _channels_last(array)
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        white = 255 if np.issubdtype(array.dtype, np.integer) else 1.0
        alpha = array[..., 3:4] / white
        composite = alpha * array[..., :3] + (1 - alpha) * white
        return np.round(composite).astype(array.dtype) if white == 255 else composite.astype(array.dtype)
    if channels != 3:
        raise ImageLoadError(f"an image array must have 1, 3 or 4 channels, got shape {array.shape}")
    return array


# --------------------------------------------------------------------------------------------------
# Anyres geometry (shared with the token count and the feature packing)


def select_best_resolution(original_size: tuple[int, int], possible_resolutions: list[list[int]]) -> tuple[int, int]:
    """The grid resolution (height, width) that keeps most of the image's pixels and wastes least."""
    original_height, original_width = original_size
    best_fit = None
    max_effective = 0
    min_wasted = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


def fit_size(original_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to fit `target` with its aspect ratio kept (ceil, as transformers)."""
    original_height, original_width = original_size
    target_height, target_width = target
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        return min(math.ceil(original_height * scale_w), target_height), target_width
    return target_height, min(math.ceil(original_width * scale_h), target_width)


def grid_shape(image_size: tuple[int, int], grid_pinpoints: list[list[int]], tile_size: int) -> tuple[int, int]:
    """(rows, cols) of grid tiles for an image of (height, width)."""
    height, width = select_best_resolution(image_size, grid_pinpoints)
    return height // tile_size, width // tile_size


def num_tiles(image_size: tuple[int, int], grid_pinpoints: list[list[int]], tile_size: int) -> int:
    """Tiles of one image, base tile included."""
    rows, cols = grid_shape(image_size, grid_pinpoints, tile_size)
    return 1 + rows * cols


# --------------------------------------------------------------------------------------------------
# Preprocessing
#
# Where the time goes, and how it is kept low without changing a bit of the output:
# - the source image is resized with PIL straight from its RGB PIL form (no numpy round trip) and only
#   the two resizes that change pixels are run (fit-to-grid and base tile); same-size resizes are skipped
#   because PIL returns an identical copy for them;
# - the two resizes run side by side, the base tile's on a helper thread (PIL lets go of the GIL while it
#   resamples): a 600x400 photo's took 12.3 ms one after the other and 8.0 side by side on this 2-core machine;
# - rescale + normalize depend only on (channel, uint8 value), so they are done as one table lookup per
#   channel into a table built with exactly transformers' operations and dtypes; the lookup also does the
#   HWC -> CHW transpose and writes straight into the preallocated batch `[n_images, max_tiles, 3, S, S]`.

_RESIZER: ThreadPoolExecutor | None = None  # the helper thread for base tiles, made at the first image


def _forget_resizer() -> None:
    global _RESIZER
    _RESIZER = None


# A forked child has the executor but not its thread (work sent to it would wait forever): it makes its own.
os.register_at_fork(after_in_child=_forget_resizer)


def _resize_beside(image: Image.Image, size: tuple[int, int], resample: int) -> Future:
    """`_resize` on the helper thread; `.result()` gives it. `image` must be loaded (PIL loads a lazily opened file
    on first use, which two threads must not do at once)."""
    global _RESIZER
    if _RESIZER is None:
        _RESIZER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ortllava-resize")
    return _RESIZER.submit(_resize, image, size, resample)


def _resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """PIL resize to (height, width), as transformers' PIL backend does; a same-size resize is skipped
    (PIL returns an identical copy for it)."""
    if image.size == (size[1], size[0]):
        return image
    return image.resize((size[1], size[0]), resample=resample)


def _step_target(shape: tuple[int, int], size: dict[str, int]) -> tuple[int, int]:
    """(height, width) the per-tile `resize` step of the image processor gives a piece of `shape`."""
    height, width = shape
    if "shortest_edge" in size and "height" not in size:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return size["height"], size["width"]


def _resize_for_step(image: np.ndarray, size: dict[str, int], resample: int) -> np.ndarray:
    """The per-tile `resize` step on `[H, W, C]` uint8; a no-op for the usual configs (tiles already at size)."""
    target = _step_target(image.shape[:2], size)
    if target == image.shape[:2]:
        return image
    return np.asarray(_resize(Image.fromarray(np.ascontiguousarray(image)), target, resample))


def _center_crop(image: np.ndarray, crop: dict[str, int]) -> np.ndarray:
    """transformers' `center_crop` on `[H, W, C]`, zero padding an image smaller than the crop."""
    height, width = image.shape[:2]
    crop_h, crop_w = crop["height"], crop["width"]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= height and left + crop_w <= width:
        return image[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    canvas = np.zeros((new_h, new_w, image.shape[2]), dtype=image.dtype)
    top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = image
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def _as_uint8(image: np.ndarray) -> np.ndarray:
    """Pixels as uint8 for PIL: uint8 as is, integer-valued arrays in [0, 255] cast; anything else is refused."""
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.number) and np.allclose(image, np.round(image)):
        if image.min() < 0 or image.max() > 255:
            raise ImageLoadError(f"image values must lie in [0, 255], got [{image.min()}, {image.max()}]")
        return image.astype(np.uint8)
    if np.issubdtype(image.dtype, np.number):  # (values with fractions, or NaN)
        example = image.flat[int(np.flatnonzero(image != np.round(image))[0])].item()
        raise ImageLoadError(
            f"image arrays must hold whole 0-255 pixel values, got {example!r} (dtype {image.dtype}); give uint8 pixels or a PIL image"
        )
    raise ImageLoadError(f"image arrays must hold 0-255 pixel values (got dtype {image.dtype}); give uint8 pixels or a PIL image")


def _rgb_pil(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` on a PIL image, kept as PIL: transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") of RGB is a plain copy


class ImageProcessor:
    """Anyres preprocessing of LLaVA-NeXT; `__call__` returns what `LlavaNextImageProcessorPil` returns."""

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(self, config: ImageProcessorConfig):
        self.config = config
        self.image_sources: tuple[str, ...] = IMAGE_SOURCES  # the kinds of string an image may be given as (`load_image`)
        self._mean = np.array(config.image_mean, dtype=np.float32)
        self._std = np.array(config.image_std, dtype=np.float32)
        self._table = self._value_table()

    def _value_table(self) -> np.ndarray:
        """`[3, 256]` float32: the output value of every (channel, uint8 pixel value).

        Built with transformers' own operations, order and dtypes (`rescale`: uint8 -> float64, times the
        factor, cast to float32; `normalize`: `(x - mean) / std` in float32 with float32 mean and std), so a
        lookup gives the same bits as running them on the pixels. Any other order changes the last bit.
        """
        cfg = self.config
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 256)).astype(np.float64)
        if cfg.do_rescale:
            values = values * cfg.rescale_factor
        values = values.astype(np.float32)
        if cfg.do_normalize:
            values = (values - self._mean[:, None]) / self._std[:, None]
        return np.ascontiguousarray(values, dtype=np.float32)

    # geometry ---------------------------------------------------------------------------------------

    def _count(self, image_size: tuple[int, int]) -> int:
        """Tiles `tiles` produces for an image of (height, width): the base tile and the grid pieces."""
        best = select_best_resolution(image_size, self.config.grid_pinpoints)
        tile = self.config.tile_size
        return 1 + len(range(0, best[0], tile)) * len(range(0, best[1], tile))

    def _final_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(height, width) a piece of `shape` has after the per-tile resize and center crop steps."""
        cfg = self.config
        if cfg.do_resize:
            shape = _step_target(shape, cfg.size)
        if cfg.do_center_crop:
            shape = cfg.crop_size["height"], cfg.crop_size["width"]
        return shape

    # pixels -----------------------------------------------------------------------------------------

    def rgb_image(self, image: Image.Image | np.ndarray) -> Image.Image:
        """The image as the RGB PIL image that is tiled, converted the way transformers' PIL backend converts
        it (an RGB PIL image is returned as it is); an `ImageLoadError` for what the processor cannot take."""
        cfg = self.config
        if cfg.do_convert_rgb and isinstance(image, Image.Image):
            return _rgb_pil(image)
        if cfg.do_convert_rgb:
            rgb = to_rgb(image)
        else:  # (a PIL image's array is [H, W, C] whatever its size; an array's channel axis is guessed, as transformers does)
            rgb = np.asarray(image) if isinstance(image, Image.Image) else _channels_last(image)
        rgb = _as_uint8(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ImageLoadError(f"without do_convert_rgb an image must have 3 channels, got shape {rgb.shape}")
        return Image.fromarray(np.ascontiguousarray(rgb))

    def _write_tiles(self, image: Image.Image | np.ndarray, out: np.ndarray) -> None:
        """One image -> its tiles written into `out` (`[n_tiles, 3, S, S]` float32): base image, then grid row by row."""
        cfg = self.config
        source = self.rgb_image(image)
        source.load()  # (before two threads read it)
        width, height = source.size
        tile = cfg.tile_size

        base = _resize_beside(source, cfg.base_size, cfg.resample)
        best = select_best_resolution((height, width), cfg.grid_pinpoints)
        fitted = np.asarray(_resize(source, fit_size((height, width), best), cfg.resample))
        if fitted.shape[:2] == best:
            padded = fitted
        else:
            top, left = (best[0] - fitted.shape[0]) // 2, (best[1] - fitted.shape[1]) // 2
            padded = np.zeros((best[0], best[1], 3), dtype=np.uint8)
            padded[top : top + fitted.shape[0], left : left + fitted.shape[1]] = fitted

        pieces = [np.asarray(base.result())]
        pieces += [padded[i : i + tile, j : j + tile] for i in range(0, best[0], tile) for j in range(0, best[1], tile)]
        if len(pieces) != len(out):
            raise AssertionError(f"expected {len(out)} tiles, made {len(pieces)}")
        table = self._table
        for piece, target in zip(pieces, out):
            if cfg.do_resize:
                piece = _resize_for_step(piece, cfg.size, cfg.resample)
            if cfg.do_center_crop:
                piece = _center_crop(piece, cfg.crop_size)
            if piece.shape[:2] != target.shape[1:]:
                raise ValueError(f"tiles of different sizes ({piece.shape[:2]} and {target.shape[1:]}): check size and crop_size")
            for channel in range(3):  # uint8 values always index the 256-entry table, so "clip" never clips
                np.take(table[channel], piece[..., channel], out=target[channel], mode="clip")

    def tiles(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image -> `[n_tiles, 3, S, S]` float32: the base image, then the grid tiles row by row."""
        out = np.empty((self._count(image_hw(image)), 3, *self._final_shape(self.config.base_size)), dtype=np.float32)
        self._write_tiles(image, out)
        return out

    def __getattr__(self, name: str) -> Any:
        """The config's fields under transformers' names (`image_mean`, `size`, `crop_size`, `image_grid_pinpoints`, ...)."""
        if name == "image_grid_pinpoints":
            return self.config.grid_pinpoints
        if name != "config" and name in ImageProcessorConfig.__dataclass_fields__:
            return getattr(self.config, name)
        raise AttributeError(f"ortllava's ImageProcessor has no attribute {name!r}")

    def __call__(self, images: ImageLike | list[ImageLike], return_tensors: str | None = None) -> dict[str, np.ndarray]:
        """An image or a list of them (PIL images, arrays, or what `load_image` opens: paths, URLs, base64) ->
        `pixel_values [n_images, max_tiles, 3, S, S]` (missing tiles zero) and `image_sizes [n_images, 2]` (h, w).
        `return_tensors`: None or "np" (arrays either way)."""
        check_return_tensors(return_tensors)
        if not isinstance(images, (list, tuple)):  # one image, or a 4-D array of them, as transformers' image processor takes it
            images = list(images) if getattr(images, "ndim", None) == 4 else [images]
        images = [load_image(image, sources=self.image_sources) if isinstance(image, (str, PathLike)) else image for image in images]
        for index, image in enumerate(images):
            if not isinstance(image, (Image.Image, np.ndarray)) and not hasattr(image, "__array__"):
                raise TypeError(f"image {index} is a {type(image).__name__}: give PIL images, arrays, paths or URLs")
        sizes = image_sizes(images)
        if not images:
            return {"pixel_values": np.zeros((0, 0, 3, 0, 0), np.float32), "image_sizes": sizes}
        counts = [self._count(hw) for hw in sizes.tolist()]
        shape = self._final_shape(self.config.base_size)
        batch = np.empty((len(images), max(counts), 3, *shape), dtype=np.float32)
        for index, (image, count) in enumerate(zip(images, counts)):
            self._write_tiles(image, batch[index, :count])
            batch[index, count:] = 0
        return {"pixel_values": batch, "image_sizes": sizes}


def _channels_last(image: Image.Image | np.ndarray) -> np.ndarray:
    """A 3-D array as `[H, W, C]`. Its channels are first when its first axis could hold them (1, 3 or 4),
    even if its last one could too: transformers' rule for such ambiguous shapes (a (3, 70, 3) array is a
    3-channel 70x3 image)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    return array


def image_sizes(images: list[Image.Image | np.ndarray]) -> np.ndarray:
    """`[n_images, 2]` int64: each image's (height, width), as the processor's `image_sizes`."""
    sizes = np.array([image_hw(image) for image in images], dtype=np.int64).reshape(-1, 2)
    for index, (height, width) in enumerate(sizes.tolist()):
        if height < 1 or width < 1:
            raise ImageLoadError(f"image {index} is empty ({height}x{width} pixels)")
    return sizes


def image_hw(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(height, width) of a PIL image or an array (channels first or last); an `ImageLoadError` for an array that is
    no image (a number, a row of values, a batch: of other than 2 or 3 dimensions)."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    array = _channels_last(image)
    if array.ndim not in (2, 3):
        raise ImageLoadError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    return array.shape[0], array.shape[1]
