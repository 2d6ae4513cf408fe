"""The one image reader: any common microscopy file in, RGB uint8 out, or a clear refusal.

Clinics export 8-bit JPEG/PNG, 16-bit TIFF from camera software, grayscale stored as RGB, RGBA
screenshots and palette PNGs. Everything downstream (training, scoring, reports) sees one format:
an (H, W, 3) uint8 array. A file that cannot be decoded raises `ImageReadError` naming the file
and the reason, so callers can record it and carry on.

Only `IMAGE_FORMATS` (JPEG, PNG, TIFF, BMP) are decoded, whatever the file is named: Pillow and
OpenCV both pick a decoder by content, and a format nobody exports from a microscope (EPS, which
Pillow hands to Ghostscript; GIF, WEBP, PSD, ...) is only attack surface. Such content is refused
as `unsupported format <NAME>`, named by Pillow's signature checks without being parsed.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embryo_ml.errors import ImageReadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
# The Pillow formats every image is opened with (`Image.open(..., formats=IMAGE_FORMATS)`),
# most common first: Pillow tries them in this order.
IMAGE_FORMATS = ("JPEG", "PNG", "TIFF", "BMP")
ORIENTATION_TAG = 0x0112  # EXIF orientation
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
DEFAULT_MAX_PIXELS = 64_000_000  # a 8000x8000 scan; beyond this we refuse rather than swap


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale 16-bit or float data to 0-255 by the type's range (not per image: keeps exposure)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        peak = 1.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(array) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    # Integer data wider than 8 bits: 16-bit cameras often fill only 12 bits, so scale by the
    # largest value the container holds only when the data uses it.
    top = float(array.max(initial=0))
    full = 65535.0 if top > 4095 else 4095.0 if top > 255 else 255.0
    return np.clip(array.astype(np.float32) / full * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3): grey stored as RGB, the one format downstream code sees."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("RGB",):
        return np.asarray(image, dtype=np.uint8)
    if mode in ("L", "1"):
        return _gray_to_rgb(np.asarray(image.convert("L"), dtype=np.uint8))
    if mode.startswith("I") or mode == "F":
        return _gray_to_rgb(_to_uint8(np.asarray(image)))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite on black: microscopy backgrounds are not white, and a transparent corner
        # must not turn into a bright artefact.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(
    path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> np.ndarray:
    """Decode `path` to an (H, W, 3) uint8 RGB array, upright per its EXIF orientation.

    `min_side`: the caller will shrink the image anyway, so a JPEG may be decoded at 1/2, 1/4 or
    1/8 scale (libjpeg scales while inverting the DCT, which also averages the pixels it drops),
    as long as both sides stay at least `min_side`. This is 3-4x faster than decoding a 500 px
    JPEG in full; other formats ignore it. None: full size. The size limit applies to the
    stored size. Multi-page TIFFs give their first page (with a warning). Raises
    `ImageReadError` for missing, empty, truncated, non-image or oversized files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot access file ({error.strerror})") from None
    if size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with path.open("rb") as file:
            head = file.read(len(JPEG_MAGIC))
            if head != JPEG_MAGIC:  # not a JPEG: Pillow reads the file itself
                return _decode(path, path, max_pixels, min_side)
            data = head + file.read()
    except OSError as error:
        raise ImageReadError(path, f"cannot read file ({error.strerror or error})") from None
    return _decode(io.BytesIO(data), path, max_pixels, min_side, data)


def read_image_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "<bytes>",
    min_side: int | None = None,
) -> np.ndarray:
    """`read_image` for an encoded image held in memory (e.g. posted to a model server);
    `name` stands for the file in error messages."""
    if not data:
        raise ImageReadError(name, "empty image data (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels, min_side, bytes(data))


def _decode(
    source: Path | io.BytesIO, name: object, max_pixels: int, min_side: int | None = None,
    data: bytes | None = None,
) -> np.ndarray:
    """The decoder behind `read_image` and `read_image_bytes`; `name` goes into errors,
    `data` is the encoded file when the caller holds it (JPEGs: see `_decode_jpeg`)."""
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(
                    name, f"image too large ({width}x{height} pixels, limit {max_pixels})"
                )
            if getattr(image, "n_frames", 1) > 1:
                warnings.warn(f"{name}: has {image.n_frames} pages, using the first",
                              stacklevel=3)
            upright = image.getexif().get(ORIENTATION_TAG, 1) in (1, None)
            if data is not None and upright and image.format == "JPEG":
                fast = _decode_jpeg(data, image.size, image.mode, min_side)
                if fast is not None:
                    return fast
            if min_side and image.format == "JPEG":
                # draft() picks the smallest DCT scale that keeps both sides >= the request
                image.draft(image.mode, (min_side, min_side))
            image.load()
            if not upright:
                image = ImageOps.exif_transpose(image) or image  # (a copy: only when needed)
            array = _pil_to_rgb(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, _unidentified_reason(source, data)) from None
    except Image.DecompressionBombError:
        raise ImageReadError(name, "image too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, TypeError) as error:
        # TypeError: Pillow's TIFF reader on a file without width/height ("Missing dimensions")
        reason = str(error) or error.__class__.__name__
        if "truncated" in reason.lower():
            reason = "truncated or corrupt image data"
        raise ImageReadError(name, f"cannot decode image ({reason})") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(name, f"unexpected decoded shape {array.shape}")
    return np.ascontiguousarray(array)


def _unidentified_reason(source: Path | io.BytesIO, data: bytes | None) -> str:
    """Why Pillow found no `IMAGE_FORMATS` decoder: the format the content has by Pillow's
    signature checks (`accept`, a look at the first bytes, no parsing), else unknown/corrupt."""
    try:
        if data is not None or isinstance(source, io.BytesIO):
            prefix = (data if data is not None else source.getvalue())[:16]  # type: ignore[union-attr]
        else:
            with source.open("rb") as file:
                prefix = file.read(16)
    except OSError:
        prefix = b""
    Image.init()  # registers every plugin's signature check (importing, not opening)
    for name in (*IMAGE_FORMATS, *(f for f in Image.ID if f not in IMAGE_FORMATS)):
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        try:
            detected = bool(accept and prefix and accept(prefix))
        except Exception:  # a signature check that cannot read this prefix
            detected = False
        if detected:
            if name in IMAGE_FORMATS:  # its signature, but not decodable
                break
            return f"unsupported format {name}"
    return "not a readable image (unknown or corrupt format)"


def jpeg_scale(size: tuple[int, int], min_side: int | None) -> int:
    """The DCT scale denominator (1, 2, 4 or 8) a JPEG of `size` (w, h) is decoded at: the
    largest that keeps both sides >= `min_side`, as Pillow's `draft` chooses it."""
    if not min_side:
        return 1
    fits = min(size[0] // min_side, size[1] // min_side)
    return next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)


# (scale, grey) -> OpenCV decode flag. A reduced colour flag is its grey one plus
# IMREAD_COLOR (BGR); with IMREAD_COLOR_RGB instead, OpenCV hands over RGB without a conversion.
# Orientation is Pillow's to check (see `_decode`), so OpenCV must not apply it again.
_CV_FLAGS = {
    (scale, grey): (gray_flag if grey else gray_flag | cv2.IMREAD_COLOR_RGB)
    | cv2.IMREAD_IGNORE_ORIENTATION
    for scale, gray_flag in ((1, cv2.IMREAD_GRAYSCALE), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2),
                             (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                             (8, cv2.IMREAD_REDUCED_GRAYSCALE_8))
    for grey in (False, True)
}


def _decode_jpeg(
    data: bytes, size: tuple[int, int], mode: str, min_side: int | None
) -> np.ndarray | None:
    """A plain upright RGB or grey JPEG decoded by OpenCV, or None for Pillow to decode.

    Both wrap libjpeg-turbo with the same settings, so the pixels are identical (tested), but
    OpenCV decodes straight into the array: 0.65 instead of 1.0 ms for a 500 px JPEG at half
    scale, the largest single cost of scoring an image. Pillow still reads the header (format,
    size, EXIF orientation) and decodes everything else: CMYK, rotated, or a file that does not
    end with the end-of-image marker, so a truncated file gets Pillow's clear refusal instead of
    OpenCV's grey-filled remainder.
    """
    if mode not in ("RGB", "L") or not data.startswith(JPEG_MAGIC) or not data.endswith(JPEG_END):
        return None  # (OpenCV, too, decodes by content: only JPEG bytes ever reach it)
    scale = jpeg_scale(size, min_side)
    grey = mode == "L"
    try:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), _CV_FLAGS[(scale, grey)])
    except cv2.error:
        return None
    expected = (-(-size[1] // scale), -(-size[0] // scale))
    if decoded is None or decoded.shape[:2] != expected:
        return None
    if grey:
        return _gray_to_rgb(decoded)
    return np.ascontiguousarray(decoded)  # (the same array when it already is)
