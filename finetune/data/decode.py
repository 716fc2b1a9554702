"""Decode one image file to an RGB uint8 array, the same way for training, evaluation and prediction."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.data.limits import bomb_problem, file_size_problem, pixel_problem
from finetune.data.members import read_member, split_member_path
from finetune.errors import DataError

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 pixels of an opened image: first frame, EXIF orientation applied, 16-bit scaled, palettes expanded."""
    img.seek(0)  # first frame of GIF/TIFF stacks
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_MODES:
        array = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
        img = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("P", "PA", "LA"):
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | Path) -> np.ndarray:
    """Decode to an RGB uint8 array: EXIF orientation applied; grey, palette, alpha, 16-bit, CMYK converted.

    RGB and greyscale JPEGs go through OpenCV (1.5x faster than PIL here, the same pixels: benchmarks/bench_data.py);
    every other file through PIL, whose conversions (CMYK above all) a consumer of an exported model reproduces with
    Pillow alone. Callers screen out truncated files first. The limits of `finetune.data.limits` apply: a file too
    large is not read, an image with too many pixels is not decoded. An image inside a shard
    (`DIR/val-000000.tar::val000000012.jpg`, see `finetune.data.shards`) is read from its tar file.
    """
    if split_member_path(path) is not None:
        return decode_bytes(read_member(path), where=printable(path))
    too_large = file_size_problem(path)
    if too_large is not None:
        raise DataError(f"cannot read image {printable(path)}: {too_large}")
    try:
        data = Path(path).read_bytes()  # bytes, not a path, go to the decoders: any file name works (OpenCV crashes on some)
    except OSError as exc:
        raise DataError(f"cannot read image {printable(path)}: {exc.strerror}") from None
    return decode_bytes(data, where=printable(path))


def decode_bytes(data: bytes, *, where: str) -> np.ndarray:
    """The pixels `load_image` gives for a file holding `data` (an upload, say); `where` names it in the error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            too_many = pixel_problem(*img.size)
            if too_many is not None:
                raise DataError(f"cannot decode image {where}: {too_many}")
            if img.format == "JPEG" and img.mode in ("RGB", "L"):  # the header alone: cheap
                bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # IMREAD_COLOR applies the EXIF orientation
                if bgr is not None:
                    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            return pil_to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise DataError(f"cannot decode image {where}: {bomb_problem(exc)}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}") from None


def as_rgb(picture: Any, *, where: str) -> np.ndarray:
    """An in-memory picture (PIL image, or uint8 array H x W x 3 RGB / H x W grey / H x W x 4 RGBA) as the RGB uint8
    array `load_image` gives for the same picture saved to a file."""
    if isinstance(picture, Image.Image):
        return pil_to_rgb(picture)
    if not isinstance(picture, np.ndarray):
        raise DataError(f"{where} is a {type(picture).__name__}; pass a file path, a folder, a PIL image or a numpy array")
    if picture.dtype != np.uint8:
        raise DataError(
            f"{where} is a {picture.dtype} array; pass uint8 RGB pixels from 0 to 255, e.g. (x * 255).round().astype('uint8')"
        )
    if picture.ndim == 2 or (picture.ndim == 3 and picture.shape[2] == 1):
        return np.repeat(picture.reshape(*picture.shape[:2], 1), 3, axis=2)
    if picture.ndim == 3 and picture.shape[2] in (3, 4):
        return np.ascontiguousarray(picture[..., :3])
    raise DataError(f"{where} is an array of shape {picture.shape}; pass height x width x 3 (RGB) or height x width (grey)")


def printable(path: str | Path) -> str:
    """A path for messages: bytes that are not UTF-8 (kept losslessly as surrogate escapes) shown as \\xNN."""
    return os.fsencode(str(path)).decode("utf-8", errors="backslashreplace")
