"""Safe image loading: a path, bytes, file object, data URL or PIL image in; a decoded, upright RGB image out.

Every failure (missing file, not an image, corrupt or truncated data, too many pixels) raises ImageError
with a message naming the input and saying what to do; no raw PIL or OS error escapes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import urllib.parse
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from duomo.errors import ImageError

DRAFT_FACTOR = 4  # decode JPEGs at no less than this many times the model's input size (see load_image)
MAX_IMAGE_PIXELS: int = 89_478_485  # PIL's default bomb guard; read at call time, so setting it takes effect

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def load_image(source: ImageLike, max_pixels: int | None = None, min_side: int | None = None) -> Image.Image:
    """Open, size-check, fully decode, EXIF-rotate and convert one image to RGB; failures are ImageError.

    `min_side`: a JPEG may be decoded at a reduced scale (libjpeg's DCT scaling, 1/2 to 1/8) as long as both
    sides stay at least this long; a model that resizes to S pixels loses nothing measurable from a decode at
    DRAFT_FACTOR * S or more, and a 24-megapixel photo decodes several times faster.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    name = _describe(source)
    # a PIL image belongs to the caller, so it is not closed; a file we open is closed on the way out
    is_pil = isinstance(source, Image.Image)
    opened = nullcontext(source) if is_pil else _open(_as_file(source, name), name)
    with opened as img:
        _check_size(img, limit, name)
        if min_side and not is_pil and img.format == "JPEG":
            with contextlib.suppress(Exception):  # a draft is an optimisation: any trouble, decode in full
                img.draft("RGB", (min_side, min_side))
        try:
            img.load()  # decode everything now, so truncated or corrupt data fails here and not in a worker
        except Exception as err:
            raise ImageError(
                f"image {name} is corrupt or truncated ({_reason(err)}); re-download or re-export the file"
            ) from err
        return to_rgb(_upright(img))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha is dropped (as in OpenCLIP), 16/32-bit and float are rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_gray_to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode == "PA" or (img.mode == "P" and "transparency" in img.info):
        # same pixels as convert("RGB"), without PIL's warning about palette transparency
        img = img.convert("RGBA")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(
            f"cannot convert an image of mode {img.mode!r} to RGB ({_reason(err)}); "
            "save it as an 8-bit RGB or grayscale PNG/JPEG"
        ) from err


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map one-channel high-depth pixels to 0..255: 16-bit by /257, floats in [0, 1] by x255, else clip."""
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8)
    a = a.astype(np.int64)
    if mode == "I" and a.size and a.min() >= 0 and a.max() <= 255:
        return a.astype(np.uint8)  # 8-bit data widened to 32 bits (e.g. convert("I") of an L image)
    a = np.clip(a, 0, 65535)  # 16-bit data; mode I is how older PIL opens 16-bit PNGs
    return ((a + 128) // 257).astype(np.uint8)  # rounds v * 257 back to v exactly


def _describe(source: object) -> str:
    """A short human name of an image source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text.startswith("data:"):
            return f"data URL ({text[5:].split(',', 1)[0] or 'no media type'}, {len(text)} chars)"
        return repr(text)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    return repr(getattr(source, "name", None) or f"<{type(source).__name__}>")


def _as_file(source: ImageLike, name: str) -> str | BinaryIO:
    """Turn a source into something Image.open accepts: a path string or a binary file object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("got 0 bytes of image data; pass the contents of an image file")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if path.startswith("data:"):
            return io.BytesIO(_decode_data_url(path, name))
        if path.startswith(("http://", "https://")):
            raise ImageError(
                f"{name} is a URL; duomo does not fetch URLs, download the image and pass the file"
            )
        if not Path(path).exists():
            raise ImageError(f"image file {name} does not exist; check the path")
        if Path(path).is_dir():
            raise ImageError(f"{name} is a directory, not an image file; pass a file inside it")
        return path
    if hasattr(source, "read"):
        return source  # type: ignore[return-value]
    raise ImageError(
        f"cannot load an image from {type(source).__name__}; pass a path, bytes, a file object, "
        "a data: URL or a PIL image"
    )


def _decode_data_url(url: str, name: str) -> bytes:
    """The payload of a data: URL (base64 or percent-encoded)."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ImageError(f"{name} is not a valid data URL; expected data:image/png;base64,<data>")
    if header.endswith(";base64"):
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as err:
            raise ImageError(f"{name} has invalid base64 data ({err}); re-encode the image") from err
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if not data:
        raise ImageError(f"{name} holds no data; pass a data URL with the image bytes after the comma")
    return data


def _open(fp: str | BinaryIO, name: str) -> Image.Image:
    """Image.open (header only) with PIL's own bomb warning silenced; our limit is checked right after."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"image {name} is too large to decode safely ({_reason(err)}); downscale it before loading"
        ) from err
    except FileNotFoundError as err:
        raise ImageError(f"image file {name} does not exist; check the path") from err
    except Image.UnidentifiedImageError as err:
        raise ImageError(
            f"{name} is not a recognised image; pass a JPEG, PNG, WebP, GIF, BMP or TIFF file"
        ) from err
    except Exception as err:
        raise ImageError(
            f"cannot open image {name} ({_reason(err)}); check the file is a readable image"
        ) from err


def _check_size(img: Image.Image, limit: int, name: str) -> None:
    """Refuse images with more pixels than limit, before any pixel data is decoded."""
    pixels = img.width * img.height
    if pixels > limit:
        raise ImageError(
            f"image {name} is {img.width}x{img.height} = {pixels:,} pixels, over the limit of {limit:,} "
            "(a guard against decompression bombs); downscale it, or pass a larger max_pixels"
        )


def _upright(img: Image.Image) -> Image.Image:
    """A copy of img rotated/flipped as its EXIF orientation says; unreadable EXIF is ignored."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img.copy()  # broken metadata should not cost a readable image


def _reason(err: BaseException) -> str:
    """The error's own message, or its type name when it has none."""
    return str(err) or type(err).__name__
