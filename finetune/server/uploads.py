"""An uploaded image checked and decoded: the size and pixel limits from its header before any pixel is decoded,
then finetune's own decode (`decode_bytes`, the pixels `finetune predict` gets from the same file)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from finetune.data.decode import decode_bytes
from finetune.errors import DataError

MEGABYTE = 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may carry: bytes per image, pixels per image, images per request."""

    max_bytes: int = 20 * MEGABYTE
    max_pixels: int = 50_000_000
    max_files: int = 64

    @property
    def max_request_bytes(self) -> int:
        """A multipart body holding `max_files` images at the limit, with room for the part headers."""
        return self.max_files * (self.max_bytes + 4096)


class UploadError(DataError):
    """An upload the server refuses: the HTTP status, the file it names and a short reason code."""

    def __init__(self, message: str, *, file: str, reason: str, status: int) -> None:
        super().__init__(message)
        self.file, self.reason, self.status = file, reason, status

    def to_dict(self) -> dict[str, str]:
        return {"error": str(self), "file": self.file, "reason": self.reason}


def too_large(file: str, size: int, limits: Limits) -> UploadError:
    return UploadError(
        f"{file} is {size / MEGABYTE:.1f} MB, over the server's limit of {limits.max_bytes / MEGABYTE:.1f} MB per image; "
        "send a smaller file (or start the server with a larger --max-bytes)",
        file=file,
        reason="too_large",
        status=413,
    )


def decode_upload(data: bytes, *, file: str, limits: Limits) -> np.ndarray:
    """RGB uint8 pixels of one uploaded file, or an UploadError saying what is wrong with it."""
    if not data:
        raise UploadError(f"{file} is empty (0 bytes); send the image file's bytes", file=file, reason="empty", status=400)
    if len(data) > limits.max_bytes:
        raise too_large(file, len(data), limits)
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError:
        width, height = limits.max_pixels + 1, 1
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        why = "no image format recognised in its header" if isinstance(exc, UnidentifiedImageError) else str(exc)[:120]
        raise UploadError(
            f"{file} is not an image ({why}); send a JPEG, PNG, WebP, BMP, GIF or TIFF file",
            file=file,
            reason="not_an_image",
            status=415,
        ) from None
    if width * height > limits.max_pixels:
        raise UploadError(
            f"{file} has {width * height:,} pixels, over the server's limit of {limits.max_pixels:,}; "
            "downscale it (or start the server with a larger --max-pixels)",
            file=file,
            reason="too_many_pixels",
            status=413,
        )
    try:
        return decode_bytes(data, where=file)
    except DataError as exc:
        raise UploadError(str(exc), file=file, reason="undecodable", status=422) from None
