"""How big an image may be, decided before memory is spent on it: one rule for screening, training, evaluation,
export parity and prediction.

1. The file's size, from `os.stat`, before a byte is read: at most `MAX_FILE_BYTES`.
2. Its pixels, from its header, before it is decoded: at most `MAX_PIXELS` (Pillow's own decompression-bomb limit,
   so every image that decoded before still does, and the others say why they do not).
3. The resize: the short side scaled to the model's size must not make the long side huge. A thin image (1 x 3,000,000
   px, a scanned strip) has the part its centre crop keeps cut out first (`fit_for_resize`), so the resize asks for at
   most `MAX_RESIZE_PIXELS` whatever the shape.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 2**30  # 1 GiB: a 100-megapixel 16-bit TIFF is 600 MB; a 30 GB "photo" is not a photo
MAX_PIXELS = 178_956_970  # 2 x Pillow's Image.MAX_IMAGE_PIXELS default: what Pillow decodes without DecompressionBombError
MAX_RESIZE_PIXELS = 2**24  # the largest intermediate picture a resize may ask for (48 MB as RGB)
MARGIN = 4  # source pixels kept beyond the crop on each side: the widest resampling filter (bicubic) reaches 2


def file_size_problem(path: str | Path) -> str | None:
    """Why the file at `path` is too large to read, from its size alone, or None (also when it cannot be stat'ed:
    reading it then says why)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    if size <= MAX_FILE_BYTES:
        return None
    return (
        f"{_gigabytes(size)} on disk, over the limit of {_gigabytes(MAX_FILE_BYTES)} per image file (not read); "
        "replace it with a smaller export of the picture"
    )


def pixel_problem(width: int, height: int) -> str | None:
    """Why an image of `width` x `height` pixels (read from its header) is too large to decode, or None."""
    if width * height <= MAX_PIXELS:
        return None
    return _too_many(f"{width:,} x {height:,} = {width * height:,} pixels")


def bomb_problem(exc: Exception) -> str:
    """`pixel_problem`'s message for Pillow's DecompressionBombError, whose message holds the pixel count alone."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return _too_many(f"{int(found.group(1)):,} pixels" if found else "too many pixels")


def _too_many(what: str) -> str:
    return f"{what} (from its header), over the limit of {MAX_PIXELS:,}; downscale it before use"


def _gigabytes(size: int) -> str:
    return f"{size / 2**30:.1f} GB"


def fit_for_resize(image: np.ndarray, *, short_side: int, crop: int) -> np.ndarray:
    """`image` as is when scaling its short side to `short_side` needs at most MAX_RESIZE_PIXELS; otherwise the centre
    of its long side that a centre crop of `crop` keeps after that scaling (plus a margin for the resampling filter),
    so the scaled picture stays small. The picture seen is the same but for a shift under one source pixel and the rounding that follows."""
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    if short_side * math.ceil(short_side * long / max(short, 1)) <= MAX_RESIZE_PIXELS:
        return image
    per_pixel = short / short_side  # source pixels per scaled pixel
    keep = max(short, math.ceil(crop * per_pixel) + 2 * (MARGIN + math.ceil(MARGIN * per_pixel)))  # still the long side
    # where the full-size plan's crop starts, in source pixels, so the part is cut around the same centre
    full_long, part_long = int(short_side * long / short), int(short_side * keep / short)
    begin = round((full_long - crop) / 2) * long / full_long - round((part_long - crop) / 2) * keep / part_long
    start = min(max(round(begin), 0), long - keep)
    part = image[start : start + keep] if height > width else image[:, start : start + keep]
    return np.ascontiguousarray(part)
