"""What decoding one image file revealed (`ImageFacts`), and a cache of it by file content, so that a second run
over the same folder (another recipe, a resume, `finetune check` then `train`) reads the files but decodes none.

The cache key is the SHA-256 of the file's bytes, its name (the placeholder rule reads names), Pillow's version and
pixel limit, and `RULES`, the version of the screening rules: a changed file, a renamed one, another Pillow or new
rules are examined afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import numpy as np
import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.data.decode import pil_to_rgb
from finetune.data.limits import bomb_problem, file_size_problem, pixel_problem
from finetune.files import atomic_write, default_cache_dir

log = logging.getLogger(__name__)
RULES = 2  # bump when examine_image's verdicts change


@dataclass(slots=True)
class ImageFacts:
    """What decoding one file revealed; `problem` is None for a usable image (slots: a million of them fit in memory)."""

    problem: str | None
    detail: str = ""
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] = (0, 0)
    exif_rotation: int = 1
    sha256: str = ""
    phash: int | None = None
    placeholder: str | None = None  # why it looks like an "image not found" picture, if it does


class FactsCache:
    """ImageFacts by (content, name): one small JSON file each under `root` (written atomically, so concurrent
    runs and kills leave whole entries). An unreadable entry counts as a miss; a cache that cannot be written
    is switched off with one warning, never an error."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.writable = True

    @classmethod
    def default(cls) -> FactsCache:
        """The user's cache: `screening/` in the feature cache folder ($FINETUNE_CACHE_DIR or ~/.cache/finetune)."""
        return cls(default_cache_dir() / "screening")

    def _entry(self, digest: str, name: str) -> Path:
        # Pillow's version and pixel limit decide what decodes ("unsupported", decompression bombs): part of the key
        context = f"{RULES}\0{PIL.__version__}\0{Image.MAX_IMAGE_PIXELS}\0{digest}\0{name}"
        key = hashlib.sha256(context.encode("utf-8", "surrogateescape")).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def get(self, digest: str, name: str) -> ImageFacts | None:
        try:
            fields = json.loads(self._entry(digest, name).read_text(encoding="utf-8"))
            return ImageFacts(**{**fields, "size": tuple(fields["size"])})
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def put(self, digest: str, name: str, facts: ImageFacts) -> None:
        if not self.writable:
            return
        text = json.dumps(asdict(facts), ensure_ascii=True).encode("ascii")
        try:
            atomic_write(self._entry(digest, name), lambda handle: handle.write(text), durable=False)
        except OSError as exc:
            self.writable = False
            log.warning("screening cache %s is not writable (%s): images are examined without it", self.root, exc)


FLAT_LOOK = "a flat light-grey picture"


PLACEHOLDER_NAME = re.compile(r"not.?found|placeholder|unavailable|no.?image|removed|deleted|missing", re.IGNORECASE)


def placeholder_reason(img: Image.Image, path: str | Path) -> str | None:
    """Why an image looks like the "image not found" picture an image host serves instead of a photo, or None.

    Such pictures are light grey with a line of text: one light colour fills most of the frame, there are few
    colours and almost no saturation. (A photo of an object on a white table has colour somewhere; whole datasets
    of grey scans are told apart in `check_dataset`, which keeps only rare look-alikes.)
    """
    small = Image.fromarray(pil_to_rgb(img))  # the pixels training sees (16-bit scaled, not clipped to white)
    small.thumbnail((64, 64))
    pixels = np.asarray(small, dtype=np.int64).reshape(-1, 3) // 16  # 16 levels per channel
    counts = np.bincount(pixels[:, 0] * 256 + pixels[:, 1] * 16 + pixels[:, 2], minlength=4096)
    saturation = float(np.asarray(small.convert("HSV"))[..., 1].mean())
    dominant, colours = counts.max() / counts.sum(), int(np.count_nonzero(counts))
    light = min(divmod(int(counts.argmax()), 256)[0], *divmod(int(counts.argmax()) % 256, 16)) >= 12  # near white
    if dominant >= 0.6 and light and colours <= 32 and saturation <= 20:
        return f"{FLAT_LOOK}: one colour fills {dominant:.0%} of it, {colours} colours in all"
    if PLACEHOLDER_NAME.search(Path(path).stem):
        return f"the file name '{Path(path).name}' says so"
    return None


def examine_image(path: str | Path, cache: FactsCache | None = None) -> ImageFacts:
    """Decode the whole file (not just the header) and classify what is wrong, if anything; with a `cache`, a file
    whose bytes and name were examined before is not decoded again. A file over the size limit is not read, one over
    the pixel limit not decoded (`finetune.data.limits`)."""
    too_large = file_size_problem(path)
    if too_large is not None:
        return ImageFacts(problem="too large", detail=too_large)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return ImageFacts(problem="unreadable", detail=exc.strerror or str(exc))
    if not data:
        return ImageFacts(problem="empty", detail="file has 0 bytes")
    digest = hashlib.sha256(data).hexdigest()
    name = Path(path).name
    known = cache.get(digest, name) if cache is not None else None
    if known is not None:
        return known
    facts = _decoded_facts(data, digest, path)
    if cache is not None:
        cache.put(digest, name, facts)
    return facts


def _decoded_facts(data: bytes, digest: str, path: str | Path) -> ImageFacts:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode, size = img.format, img.mode, img.size
            too_many = pixel_problem(*size)
            if too_many is not None:
                return ImageFacts(problem="too many pixels", detail=too_many, format=fmt, mode=mode, size=size, sha256=digest)
            rotation = int(img.getexif().get(0x0112, 1) or 1)
            try:
                img.load()
            except OSError as exc:
                return ImageFacts(problem="truncated", detail=str(exc), format=fmt, mode=mode, size=size, sha256=digest)
            phash = int(str(imagehash.phash(ImageOps.exif_transpose(img).convert("L"))), 16)
            placeholder = placeholder_reason(img, path)
    except UnidentifiedImageError:
        return ImageFacts(
            problem="not an image", detail=f"content is not a known image format (starts with {data[:8]!r})", sha256=digest
        )
    except Image.DecompressionBombError as exc:
        return ImageFacts(problem="too many pixels", detail=bomb_problem(exc), sha256=digest)
    except (OSError, ValueError) as exc:
        return ImageFacts(problem="unsupported", detail=str(exc), sha256=digest)
    return ImageFacts(
        problem=None,
        format=fmt,
        mode=mode,
        size=size,
        exif_rotation=rotation,
        sha256=digest,
        phash=phash,
        placeholder=placeholder,
    )
