"""Cached features on disk: validated rows per (image content, view) in shard files with an index, computed by a
`Tap` of the model.

The cache folder's name holds the hashes of the weights that compute the features and of the pipeline (with the
versions of the libraries that decode, transform and compute: `versions.DECODING_LIBRARIES`); a shard's index holds
the image's SHA-256 and the view of each row. A change of any of them, an upgrade of Pillow or torch included, is a miss, never a stale hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import albumentations as A
import numpy as np
import torch
from torch import nn

from finetune.bars import progress as progress_bar
from finetune.config.catalog import STAGES, Stage
from finetune.data.decode import load_image
from finetune.data.loader import Target
from finetune.errors import TrainingError
from finetune.files import atomic_write
from finetune.models.build import ModelBundle
from finetune.models.suffix import stage_input
from finetune.versions import DECODING_LIBRARIES, library_versions

log = logging.getLogger(__name__)
LAYOUT = 2  # meta.json's "layout": 1 (absent) was a .npy file per entry, 2 shards of rows with an index
SHARD_ROWS = 4096  # a shard is closed after this many rows, ...
SHARD_BYTES = 256 * 2**20  # ... this many bytes of rows (prefix activations are large), ...
SHARD_SECONDS = 60.0  # ... or this long after its first row, so a slow pass killed later keeps most of its work
INDEX = np.dtype([("key", "S64"), ("view", "<i4")])  # a row's image SHA-256 (hex) and view
INDEX_SUFFIX = ".index.npy"


@dataclass(frozen=True)
class Tap:
    """The input of one module of the model (the head's: pooled features; a stage's first block: the frozen
    prefix's output), computed without running the rest of the forward."""

    model: nn.Module
    module: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return stage_input(self.model, self.module, images)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """The model in eval mode (frozen BatchNorm statistics) while features are computed, as it was afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def backbone_key(bundle: ModelBundle, dtype: torch.dtype | None, *, upto: Stage = "head") -> str:
    """Hash of the architecture and every tensor of the stages before `upto` (what computes the cached input of
    `upto`; by default the whole backbone, the head excluded)."""
    stages = bundle.stages.of_tensor
    before = set(STAGES[: STAGES.index(upto)])
    parts: list[bytes | str] = [type(bundle.model).__name__, str(dtype)]
    if upto != "head":
        parts.append(f"input of {upto}")
    for name, tensor in sorted(bundle.model.state_dict().items()):
        if stages.get(name) in before:
            parts += [name, tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()]
    return _digest(*parts)


def pipeline_key(pipeline: A.Compose, *, seed: int | None) -> str:
    """Hash of albumentations' own serialization of the pipeline (plus the seed for augmented views) and of the
    versions of the libraries that decode, resize and compute: the same recipe under another Pillow, OpenCV,
    albumentations, numpy, torch or timm may give other pixels or activations, so it gets another folder."""
    versions = json.dumps(library_versions(DECODING_LIBRARIES), sort_keys=True)
    return _digest(json.dumps(A.to_dict(pipeline), sort_keys=True, default=str), str(seed), versions)


def file_key(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FeatureSet(torch.utils.data.Dataset):
    """(feature, target) pairs from an (images x views x dim) tensor; `choose_views` picks a view per image."""

    def __init__(self, features: torch.Tensor, targets: Sequence[Target]) -> None:
        self.features = features
        self.targets = list(targets)
        self.transform = None  # nothing random to seed: make_loader looks for one
        self.views = torch.zeros(len(self.targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return self.features[index, self.views[index]], self.targets[index]

    def choose_views(self, seed: int) -> None:
        if self.features.size(1) > 1:
            generator = torch.Generator().manual_seed(seed)
            self.views = torch.randint(self.features.size(1), (len(self.targets),), generator=generator)


class _Views(torch.utils.data.Dataset):
    def __init__(self, jobs: list[tuple[str, int]], pipeline: A.Compose) -> None:
        self.jobs, self.pipeline = jobs, pipeline

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, seed = self.jobs[index]
        if seed >= 0:
            self.pipeline.set_random_seed(seed)
        return self.pipeline(image=load_image(path))["image"], index


@dataclass(frozen=True)
class _Rows:
    """What a feature pass computes: the (path, seed) jobs, their cache names (image key, view), the row of the output
    array each goes to, the output's row count, and the output array when shards already filled part of it."""

    jobs: list[tuple[str, int]]
    names: list[tuple[str, int]]
    positions: list[int]
    total: int
    out: np.ndarray | None


@dataclass(frozen=True)
class ComputeOptions:
    """How missing features are computed: device, autocast dtype, batching and progress bars."""

    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    num_workers: int
    progress: bool


def _save_array(array: np.ndarray) -> Callable[[BinaryIO], None]:
    return lambda handle: np.save(handle, array, allow_pickle=False)


def _shards(folder: Path) -> list[tuple[Path, Path]]:
    """(rows, index) file pairs of a cache folder; a rows file without its index (a pass killed between the two
    writes) is not listed."""
    try:
        indexes = sorted(folder.glob(f"rows-*{INDEX_SUFFIX}"))
    except OSError:
        return []
    return [(index.with_name(index.name[: -len(INDEX_SUFFIX)] + ".npy"), index) for index in indexes]


def _open_shard(data: Path, index: Path, size: int, dtype: type[np.floating]) -> tuple[np.ndarray, np.ndarray] | None:
    """A shard's index and its rows, memory-mapped, or None when either file is unreadable, not a .npy, of another
    type, or the rows file does not hold exactly (rows of the index) x `size` values (truncated or padded)."""
    try:
        keys = np.load(index, allow_pickle=False)
        rows = np.load(data, mmap_mode="r", allow_pickle=False)
        length = data.stat().st_size
    except (OSError, ValueError, EOFError):
        return None
    good = (
        isinstance(keys, np.ndarray)
        and keys.dtype == INDEX
        and keys.ndim == 1
        and isinstance(rows, np.memmap)
        and rows.dtype == dtype
        and rows.shape == (len(keys), size)
        and length == rows.offset + rows.nbytes
    )
    return (keys, rows) if good else None


class _ShardWriter:
    """Rows of one compute pass, appended to shard files `rows-<pass id>-<n>.npy` (rows x dim) with their index
    `rows-<pass id>-<n>.index.npy` ((image key, view) per row), each written atomically, the rows before the index:
    a shard is closed every SHARD_ROWS rows, SHARD_BYTES or SHARD_SECONDS, and when the pass stops (an error included), so a
    killed pass keeps every closed shard and concurrent passes never write the same file."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self.name = uuid.uuid4().hex
        self.count = 0
        self.keys: list[tuple[str, int]] = []
        self.rows: list[np.ndarray] = []
        self.opened = time.monotonic()

    def add(self, key: tuple[str, int], row: np.ndarray) -> None:
        self.keys.append(key)
        self.rows.append(row)
        full = len(self.rows) >= SHARD_ROWS or len(self.rows) * row.nbytes >= SHARD_BYTES
        if full or time.monotonic() - self.opened >= SHARD_SECONDS:
            self.close()

    def close(self) -> None:
        if self.rows and self.cache.writable:
            stem = f"rows-{self.name}-{self.count}"
            data, index = np.stack(self.rows), np.array(self.keys, dtype=INDEX)
            try:
                atomic_write(self.cache.folder / f"{stem}.npy", _save_array(data))
                atomic_write(self.cache.folder / f"{stem}{INDEX_SUFFIX}", _save_array(index))
            except OSError as exc:
                self.cache.not_writable(exc)
            self.count += 1
        self.keys, self.rows, self.opened = [], [], time.monotonic()


@dataclass
class FeatureCache:
    """One cache folder: features of one backbone under one pipeline, rows of (image content, view) in shards.

    A shard is a .npy of rows (memory-mapped when read) with an index of (image SHA-256, view) per row; meta.json
    holds the shape of a row, the cache layout and the library versions. Every shard is validated when read (its
    index readable, its size that of its index's rows, the rows taken finite); a damaged one is discarded and its
    rows recomputed. When the folder cannot be written, features are computed in memory for this run and a warning
    says why. A folder of the older layout (a .npy file per entry) is a miss: its entries are computed again.
    """

    folder: Path
    views: int  # 0: the deterministic (eval) pipeline, one view
    seed: int = 0  # with the image hash and view index, seeds each augmented view
    writable: bool = True
    dtype: type[np.floating] = np.float32  # rows as stored: float32, or float16 for large prefix activations

    def _meta(self) -> dict | None:
        try:
            meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _shape(self) -> tuple[int, ...] | None:
        meta = self._meta()
        try:
            shape = meta["shape"] if meta and meta.get("layout") == LAYOUT else None
            return tuple(int(n) for n in shape) if shape else None
        except (ValueError, TypeError):
            return None

    def not_writable(self, exc: OSError) -> None:
        if self.writable:
            self.writable = False
            log.warning("feature cache %s is not writable (%s); features stay in memory for this run", self.folder, exc.strerror)

    def _read(self, wanted: dict[tuple[bytes, int], list[int]], out: np.ndarray) -> None:
        """Fill the rows of `out` named by `wanted` from the shards on disk, removing what was found from `wanted`;
        damaged shards are deleted (and their rows recomputed)."""
        damaged = []
        for data, index in _shards(self.folder):
            if not wanted:
                break
            opened = _open_shard(data, index, out.shape[1], self.dtype)
            if opened is None:
                damaged.append((data, index))
                continue
            keys, rows = opened
            found = [(row, key) for row, key in enumerate(zip(keys["key"].tolist(), keys["view"].tolist())) if key in wanted]
            if not found:
                continue
            block = np.asarray(rows[[row for row, _ in found]])
            if not np.isfinite(block).all():
                damaged.append((data, index))
                continue
            for values, (_, key) in zip(block, found):
                positions = wanted.pop(key, None)  # None: a duplicate row of another pass, already taken
                if positions is not None:
                    out[positions] = values
        if damaged:
            log.warning(
                "feature cache %s: %d damaged shard(s) discarded, their entries recomputed, e.g. %s",
                self.folder,
                len(damaged),
                damaged[0][0],
            )
            for data, index in damaged if self.writable else []:
                try:
                    index.unlink(missing_ok=True)
                    data.unlink(missing_ok=True)
                except OSError as exc:  # a read-only cache: the rows are computed in memory, this run stores nothing
                    self.not_writable(exc)
                    break

    def features(
        self, tap: Tap, paths: Sequence[str], pipeline: A.Compose, options: ComputeOptions
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(images x views x dim) features for `paths`, computing only what the cache lacks."""
        keys = [file_key(p) for p in progress_bar(paths, desc="hash images", disable=not options.progress, leave=False)]
        views = max(self.views, 1)
        entries = [(i, v) for i in range(len(paths)) for v in range(views)]
        shape = self._shape()
        out: np.ndarray | None = None
        wanted: dict[tuple[bytes, int], list[int]] = {}
        if shape is not None:  # no meta.json (a pass killed before its first batch): everything recomputed, not judged
            out = np.empty((len(entries), int(np.prod(shape))), self.dtype)
            for position, (i, v) in enumerate(entries):
                wanted.setdefault((keys[i].encode(), v), []).append(position)
            self._read(wanted, out)
        missing = (
            sorted(p for positions in wanted.values() for p in positions) if shape is not None else list(range(len(entries)))
        )
        if missing:
            seeds = [
                int(_digest(str(self.seed), keys[entries[p][0]], str(entries[p][1]))[:8], 16) if self.views else -1
                for p in missing
            ]
            jobs = [(paths[entries[p][0]], s) for p, s in zip(missing, seeds)]
            names = [(keys[entries[p][0]], entries[p][1]) for p in missing]
            out, shape = self._compute(tap, _Rows(jobs, names, missing, len(entries), out), pipeline, options)
        log.info("feature cache %s: %d view(s) computed, %d reused", self.folder, len(missing), len(entries) - len(missing))
        if shape is None or out is None:
            raise RuntimeError(f"feature cache {self.folder}: no shape for an empty set of images")
        return torch.from_numpy(out).view(len(paths), views, -1), shape

    @torch.inference_mode()
    def _compute(self, tap: Tap, rows: _Rows, pipeline: A.Compose, options: ComputeOptions) -> tuple[np.ndarray, tuple[int, ...]]:
        """The output array with the rows of `rows.jobs` written in place (and stored in shards under `rows.names`,
        (image key, view), when the cache is writable), and the shape of one feature. Each batch goes straight into
        the one output array: no per-image arrays (a million of them doubled the peak memory of a 1M-image pass)."""
        loader = torch.utils.data.DataLoader(
            _Views(rows.jobs, pipeline), batch_size=options.batch_size, num_workers=options.num_workers
        )
        out = rows.out
        shape: tuple[int, ...] = ()
        shards = _ShardWriter(self)
        with tap.evaluating(), contextlib.ExitStack() as closing:
            closing.callback(shards.close)  # also on an error or Ctrl-C: the rows computed so far are kept
            for images, indices in progress_bar(loader, desc="cache features", disable=not options.progress, leave=False):
                with torch.autocast(options.device.type, dtype=options.dtype, enabled=options.dtype is not None):
                    batch = tap(images.to(options.device)).float().cpu()
                if not shape:  # meta.json before the first entry: a pass killed later keeps what it stored
                    shape = tuple(batch.shape[1:])
                    self._write_meta(shape)
                with np.errstate(over="ignore"):  # an overflow is checked on the next line and refused with the fix
                    stored = batch.flatten(1).numpy().astype(self.dtype)
                if not np.isfinite(stored).all() and np.isfinite(batch.numpy()).all():
                    raise TrainingError(
                        f"feature cache {self.folder}: activations exceed the float16 range; "
                        "set train.cache_precision: fp32 (or train.feature_cache: off)"
                    )
                if out is None or out.shape[1] != stored.shape[1]:  # (a meta.json of another shape: no shard was read)
                    out = np.empty((rows.total, stored.shape[1]), self.dtype)
                places = [rows.positions[index] for index in indices.tolist()]
                out[places] = stored
                for place, index in zip(places, indices.tolist()):
                    shards.add(rows.names[index], out[place])
        if out is None:
            raise RuntimeError(f"feature cache {self.folder}: no rows computed")
        return out, shape

    def _write_meta(self, shape: tuple[int, ...]) -> None:
        if self.writable and self._shape() != shape:
            # the versions are already in the folder's name; written here so a person can tell what made the entries
            meta = {"shape": list(shape), "layout": LAYOUT, "versions": library_versions(DECODING_LIBRARIES)}
            text = json.dumps(meta, sort_keys=True).encode("utf-8")
            with contextlib.suppress(OSError):  # without meta.json the entries are recomputed next time: slower, never wrong
                atomic_write(self.folder / "meta.json", lambda handle: handle.write(text))
