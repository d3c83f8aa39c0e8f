"""Image sources: what a caller may give as an image (a PIL image, an array or tensor, a path, a `file://`, http(s)
or `data:` URL, a base64 string) opened as transformers' `load_image` opens it, with clear errors
(`ImageLoadError`, naming the source), a size and time limit on downloads, and for what is decoded here, the ordinary
image formats only (`IMAGE_FORMATS`) and a limit on pixels (`MAX_IMAGE_PIXELS`)."""

from __future__ import annotations

import base64
import errno
import io
import os
import re
import stat
import time
import urllib.request
from pathlib import Path
from typing import Collection, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[Image.Image, np.ndarray, str, Path]

URL_TIMEOUT_S = 20.0
URL_MAX_BYTES = 50 * 1024 * 1024
# The image formats a path, URL or base64 string may hold: the ordinary raster ones. PIL reads many more, and some run
# other programs or parse much more (EPS runs Ghostscript; PDF, PSD, ...): not for images from anywhere.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
# The most pixels (width x height) an image read from a path, URL or base64 string may have, checked on its header
# before its pixels are decoded (a small PNG can hold 12000x12000 pixels, 144 M, and take gigabytes decoded): PIL's
# own limit (`PIL.Image.MAX_IMAGE_PIXELS`, 89.5 M), above which PIL only warns of a decompression bomb. A caller may
# raise it (PIL refuses images above twice its own limit whatever this says: raise that too), or set None: no limit.
MAX_IMAGE_PIXELS: int | None = 89_478_485
# The kinds of image source a string may name: "file" (a path, or a file:// URL), "http" (an http(s) URL) and "data"
# (a data: URI, or base64). A server given images by untrusted clients accepts only "data" (see `Pipeline`'s
# `image_sources`): a path would let a client read the server's files, a URL make it fetch from the network.
IMAGE_SOURCES = ("file", "http", "data")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class ImageLoadError(ValueError):
    """An image could not be read; the message names its source."""


def image_source_kinds(kinds: Collection[str]) -> tuple[str, ...]:
    """`kinds` checked: a collection of `IMAGE_SOURCES` names (a ValueError names one that is not)."""
    if isinstance(kinds, str) or not all(kind in IMAGE_SOURCES for kind in kinds):
        raise ValueError(f"image_sources must be a collection of {', '.join(map(repr, IMAGE_SOURCES))}, got {kinds!r}")
    return tuple(kind for kind in IMAGE_SOURCES if kind in kinds)


def load_image(source: ImageLike, timeout: float = URL_TIMEOUT_S, sources: Collection[str] = IMAGE_SOURCES) -> Image.Image:
    """Opens a path (or a `file://` URL), an http(s) URL, a `data:image/...;base64,` URI or a base64 string the way
    transformers' `load_image` does: EXIF-rotated, then `convert("RGB")`.

    PIL images and arrays are returned as given (a tensor as its array); `to_rgb` converts them later, as the image
    processor does.
    `timeout` (seconds) bounds a URL's download. `sources`: the kinds of string source taken (`IMAGE_SOURCES`); one of
    another kind is an ImageLoadError before anything is read (a path, then, is never looked up).
    """
    if isinstance(source, Image.Image):
        try:
            source.load()  # (pixels a lazily opened image has not read yet; a closed image fails here)
        except Exception as error:  # PIL raises many types for damaged files
            raise ImageLoadError(f"cannot read the PIL image given: {error}") from error
        return source
    if isinstance(source, np.ndarray):
        return source
    if hasattr(source, "__array__") and not isinstance(source, (str, os.PathLike)):  # a torch (or other) tensor, as transformers takes
        try:
            return np.asarray(source)
        except Exception as error:  # (a GPU tensor, or one that needs grad, has no host array)
            raise ImageLoadError(f"cannot read the {type(source).__name__} given as an array: {error} (give tensor.detach().cpu().numpy())") from error
    if not isinstance(source, (str, os.PathLike)):
        raise ImageLoadError(f"unsupported image type {type(source).__name__}: give a PIL image, an array (or a tensor), a path or a URL")
    text = os.fspath(source)
    name = _shortened(text)
    data = _read_source(text, isinstance(source, str), timeout, sources)
    try:
        image = _open(data)  # (its header only)
        _check_pixels(image.size, name)
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:
        formats = ", ".join(IMAGE_FORMATS)
        raise ImageLoadError(f"cannot decode image {name}: not in an image format taken here ({formats})") from error
    except Image.DecompressionBombError as error:  # (above twice PIL's own limit: refused while the header is read)
        raise ImageLoadError(f"cannot decode image {name}: {error} (PIL.Image.MAX_IMAGE_PIXELS sets PIL's limit)") from error
    except Exception as error:  # PIL raises many types for damaged files
        raise ImageLoadError(f"cannot decode image {name}: {error}") from error


def _open(data: bytes) -> Image.Image:
    """`data` opened lazily (its header read, not its pixels) by PIL, as one of `IMAGE_FORMATS` only."""
    Image.init()  # (registers every plugin once: a format of IMAGE_FORMATS that this PIL lacks is left out, not a KeyError)
    return Image.open(io.BytesIO(data), formats=[name for name in IMAGE_FORMATS if name in Image.OPEN])


def _check_pixels(size: tuple[int, int], name: str) -> None:
    """An ImageLoadError for an image of `size` (width, height) above `MAX_IMAGE_PIXELS`, before its pixels are decoded."""
    width, height = size
    if MAX_IMAGE_PIXELS is not None and width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"image {name} is {width}x{height} pixels ({width * height}), above the limit of {MAX_IMAGE_PIXELS} pixels "
            "(a possible decompression bomb); a caller that trusts its images may raise "
            "ortllava.preprocess.image_source.MAX_IMAGE_PIXELS"
        )


def _read_source(text: str, may_be_base64: bool, timeout: float, sources: Collection[str] = IMAGE_SOURCES) -> bytes:
    """The bytes of an image source: a URL's download, a data URI's payload, a file's content, or a base64
    string's decoding (tried for a string that is no readable file, as transformers does); only of the kinds in
    `sources`."""
    if not text.strip():  # (Path("") is the current folder: "Is a directory" would say nothing useful)
        raise ImageLoadError("an empty string was given as an image: give a path, a URL or base64 data")

    def refused(what: str) -> ImageLoadError:
        return ImageLoadError(f"{what} are not taken here (image sources taken: {', '.join(sources) or 'none'}): give the image itself, {_shortened(text, 60)}")

    if text.startswith(("http://", "https://")):
        if "http" not in sources:
            raise refused("image URLs")
        return fetch_url(text, timeout=timeout)
    if text.startswith("data:") and "data" not in sources:
        raise refused("data: URIs")
    if "file" not in sources and not text.startswith("data:"):  # (no path is looked up: a client learns nothing of the files)
        decoded = _decode_base64(text) if may_be_base64 and "data" in sources and not text.startswith("file://") else None
        if decoded is None or not _looks_like_an_image(decoded):
            raise refused("image paths")
        return decoded
    if text.startswith("file://"):  # a local file as a URL (transformers reads no such URL; its path is plain here)
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        url = urlparse(text)
        if url.netloc not in ("", "localhost"):
            raise ImageLoadError(f"cannot read image {_shortened(text)}: a file:// URL must name a file on this machine")
        text = url2pathname(url.path)
        may_be_base64 = False
    elif text.startswith("data:"):  # (transformers decodes a data:image/ URI's payload as base64, marked so or not)
        header, _, payload = text.partition(",")
        decoded = _decode_base64(payload) if header.startswith("data:image/") else None
        if decoded is None:
            raise ImageLoadError(f"cannot read image {_shortened(text)}: a data URI must be data:image/...;base64,<base64 data>")
        return decoded
    try:
        return _read_file(Path(text))
    except OSError as error:
        decoded = _decode_base64(text) if may_be_base64 and "data" in sources else None
        if decoded is None or not _looks_like_an_image(decoded):
            raise ImageLoadError(f"cannot read image file {_shortened(text)}: {error.strerror or error}") from error
        return decoded


def _read_file(path: Path) -> bytes:
    """A regular file's bytes; an OSError for anything else (a folder, a FIFO or a device such as /dev/zero would
    block or never end)."""
    with open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0))) as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return file.read()


def _decode_base64(text: str) -> bytes | None:
    """`text`'s base64 decoding (whitespace ignored), or None where it is not base64."""
    compact = "".join(text.split())
    if not compact or not _BASE64.fullmatch(compact):
        return None
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4))
    except ValueError:
        return None


def _looks_like_an_image(data: bytes) -> bool:
    try:
        _open(data)  # reads the header only
        return True
    except Image.DecompressionBombError:  # (an image, too large: `load_image` says so)
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types
        return False


def _shortened(text: str, most: int = 120) -> str:
    """`text` for an error message: a base64 payload can be megabytes long."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """Downloads `url` with a size limit and a time limit: `timeout` seconds for the connection and for each
    wait on the server, and for the whole download, checked as data arrives (so a server that sends a byte
    now and then is given up on after at most about twice `timeout`)."""
    deadline = time.monotonic() + timeout
    received: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) checked by caller
            while block := response.read1(1 << 16):  # what has arrived, up to 64 KiB: one wait at most
                received.append(block)
                size += len(block)
                if size > max_bytes:
                    raise ImageLoadError(f"image {url} is larger than the {max_bytes} byte limit")
                if time.monotonic() > deadline:
                    raise ImageLoadError(f"cannot fetch image {url}: the download took longer than {timeout:g} s")
    except ImageLoadError:
        raise
    except Exception as error:
        raise ImageLoadError(f"cannot fetch image {url}: {error}") from error
    return b"".join(received)
