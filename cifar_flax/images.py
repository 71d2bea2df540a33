"""Safe image opening and conversion to CIFAR-style 32x32 RGB uint8 arrays.

One decoder for everything: image-folder datasets, the predictor and the UI all
go through `load_rgb32`, so training and inference see exactly the same pixels.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]

CIFAR_SIZE = (32, 32)
# Modes Pillow converts to RGB correctly on its own (no alpha to composite).
_DIRECT_RGB_MODES = {"RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"}
# Modes whose alpha channel must be composited on white rather than dropped
# (dropping alpha shows whatever colour transparent pixels happen to store).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


class ImageError(ValueError):
    """An input that cannot be turned into an image (the message names it)."""


def open_image(source: ImageSource) -> Image.Image:
    """Open `source` (path, PIL image or numpy array) as a fully loaded PIL image.

    EXIF orientation is applied and animated images give their first frame.
    Raises FileNotFoundError / IsADirectoryError for bad paths and ImageError for
    empty, non-image, truncated or oversized (decompression bomb) files.
    """
    return _open(source, draft_size=None)[0]


def _open(
    source: ImageSource, *, draft_size: tuple[int, int] | None
) -> tuple[Image.Image, tuple[int, int]]:
    """open_image plus the stored size (before any JPEG draft reduction).

    `draft_size` lets JPEGs decode at a reduced DCT scale that is still at least
    that size (much faster for large photos headed for 32x32).
    """
    if isinstance(source, Image.Image):
        image = source
        if getattr(image, "is_animated", False):
            image.seek(0)
        return _load_oriented(image, name=_describe(image)), image.size
    if isinstance(source, np.ndarray):
        image = _array_to_image(source)
        return image, image.size
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(
            f"Unsupported image source of type {type(source).__name__}; "
            "expected a path, a PIL.Image.Image or a numpy array."
        )
    path = os.fspath(source)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"Expected an image file but got a directory: {path}") from None
    with file:
        if os.fstat(file.fileno()).st_size == 0:
            raise ImageError(f"Image file is empty (0 bytes): {path}")
        try:
            image = Image.open(file)
        except Image.DecompressionBombError as error:
            raise ImageError(f"Image is too large (decompression bomb guard): {path}: {error}") from error
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise ImageError(f"Not a readable image file: {path}: {error}") from error
        with image:
            stored_size = image.size
            _check_pixel_count(image, path)
            if _can_draft(image, draft_size):
                image.draft("RGB", draft_size)
            # `seek(0)` is the default frame; loading it reads only that frame.
            image = _load_oriented(image, name=path)
    return image, stored_size


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Convert a PIL image of any common mode to an (H, W, 3) uint8 RGB array.

    Transparent pixels are composited on white; 16-bit and float images are
    scaled to 8 bits.
    """
    return np.asarray(_to_rgb_image(image), dtype=np.uint8)


def load_rgb32(source: ImageSource) -> np.ndarray:
    """Open `source` and return it as a (32, 32, 3) uint8 RGB array.

    Images of another size are resized with Lanczos (antialiased) filtering;
    non-square images are squashed, not cropped, so no content is lost.
    """
    return _load_rgb32(source)[0]


def load_rgb32_many(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, int]:
    """`load_rgb32` over many files: ((N, 32, 32, 3) uint8, how many were resized).

    Runs in-process and inside the decoding subprocesses of `cifar_flax.data`.
    """
    images = np.empty((len(paths), *CIFAR_SIZE, 3), np.uint8)
    resized = 0
    for index, path in enumerate(paths):
        images[index], was_resized = _load_rgb32(path)
        resized += was_resized
    return images, resized


def decode_worker_main() -> int:
    """Entry point of a decoding subprocess (see cifar_flax.data): NUL-separated paths on
    stdin -> 8-byte little-endian resized count, then (N, 32, 32, 3) uint8 pixels, on stdout.
    Errors go to stderr as "<ExceptionType>: <message>" with exit status 2."""
    paths = [os.fsdecode(path) for path in sys.stdin.buffer.read().split(b"\0") if path]
    try:
        images, resized = load_rgb32_many(paths)
    except (OSError, ValueError) as error:
        sys.stderr.write(f"{type(error).__name__}: {error}")
        return 2
    sys.stdout.buffer.write(np.int64(resized).astype("<i8").tobytes())
    sys.stdout.buffer.write(images.tobytes())
    sys.stdout.buffer.flush()
    return 0


def _load_rgb32(source: ImageSource) -> tuple[np.ndarray, bool]:
    image, stored_size = _open(source, draft_size=CIFAR_SIZE)
    image = _to_rgb_image(image)
    resized = stored_size != CIFAR_SIZE
    if image.size != CIFAR_SIZE:
        image = image.resize(CIFAR_SIZE, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8), resized


def _can_draft(image: Image.Image, draft_size: tuple[int, int] | None) -> bool:
    """JPEG DCT scaling only pays off when it can at least halve the image."""
    return (
        draft_size is not None
        and image.format == "JPEG"
        and image.width >= 2 * draft_size[0]
        and image.height >= 2 * draft_size[1]
    )


def _describe(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return filename or f"<{image.mode} image {image.size[0]}x{image.size[1]}>"


def _check_pixel_count(image: Image.Image, path: str) -> None:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat it as an error.
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ImageError(
            f"Image is too large (decompression bomb guard): {path} has {width}x{height}"
            f" = {width * height} pixels, limit is {limit} (PIL.Image.MAX_IMAGE_PIXELS)."
        )


def _load_oriented(image: Image.Image, *, name: str) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"Image file is truncated or corrupt: {name}: {error}") from error
    if getattr(image, "is_animated", False):
        # Keep only the loaded first frame, detached from the (multi-frame) file.
        image = image.copy()
    orientation = image.getexif().get(0x0112, 1)  # EXIF Orientation tag
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return image


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(
            f"Unsupported array shape {array.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"Array image is empty: shape {array.shape}.")
    array = _scale_to_uint8(array, name=f"array of dtype {array.dtype}")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.shape[2] if array.ndim == 3 else 2]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _scale_to_uint8(values: np.ndarray, *, name: str) -> np.ndarray:
    """Map integer/float/bool pixel values to uint8 (16-bit by >>8, float by range)."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    if np.issubdtype(values.dtype, np.integer):
        high = int(values.max(initial=0))
        low = int(values.min(initial=0))
        if low >= 0 and high <= 255 and values.dtype.itemsize == 1:
            return values.astype(np.uint8)
        if low >= 0 and high <= 65535:
            return (values.astype(np.uint32) >> 8).astype(np.uint8)  # 16-bit range
        return _stretch(values.astype(np.float64))
    if np.issubdtype(values.dtype, np.floating):
        values = np.nan_to_num(values.astype(np.float64), nan=0.0)
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        if low >= 0.0 and high <= 1.0:
            return np.round(values * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0:
            return np.round(values).astype(np.uint8)
        return _stretch(values)
    raise ImageError(f"Unsupported pixel dtype: {name}; expected uint8, uint16, bool or float.")


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _to_rgb_image(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _HIGH_DEPTH_MODES:
        gray = _scale_to_uint8(np.asarray(image), name=f"{mode} image")
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _DIRECT_RGB_MODES:
        return image.convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageError(f"Cannot convert image mode {mode!r} to RGB: {_describe(image)}") from error
