"""Cached features on disk: one validated .npy file per (image content, view), computed by a `Tap` of the model.

The cache folder's name holds the hashes of the weights that compute the features and of the pipeline (with the
versions of the libraries that decode, transform and compute: `versions.DECODING_LIBRARIES`); the file name holds the
image's SHA-256. A change of any of them, an upgrade of Pillow or torch included, is a miss, never a stale hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
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
class ComputeOptions:
    """How missing features are computed: device, autocast dtype, batching and progress bars."""

    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    num_workers: int
    progress: bool


def _save_row(row: np.ndarray) -> Callable[[BinaryIO], None]:
    return lambda handle: np.save(handle, row, allow_pickle=False)


def _read_row(path: Path, size: int, dtype: type[np.floating]) -> np.ndarray | None:
    """A cached feature row, or None when the file is truncated, not a .npy, of another size or type, or not finite."""
    try:
        row = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    good = isinstance(row, np.ndarray) and row.dtype == dtype and row.shape == (size,) and bool(np.isfinite(row).all())
    return row if good else None


@dataclass
class FeatureCache:
    """One cache folder: features of one backbone under one pipeline, a file per (image content, view).

    Every entry is validated when read; a damaged one is discarded and recomputed. When the folder
    cannot be written, features are computed in memory for this run and a warning says why.
    """

    folder: Path
    views: int  # 0: the deterministic (eval) pipeline, one view
    seed: int = 0  # with the image hash and view index, seeds each augmented view
    writable: bool = True
    dtype: type[np.floating] = np.float32  # rows as stored: float32, or float16 for large prefix activations

    def _file(self, image_key: str, view: int) -> Path:
        return self.folder / image_key[:2] / f"{image_key}.v{view}.npy"

    def _shape(self) -> tuple[int, ...] | None:
        try:
            shape = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))["shape"]
            return tuple(int(n) for n in shape) if shape else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _cached_rows(
        self, files: dict[tuple[int, int], Path], shape: tuple[int, ...] | None
    ) -> dict[tuple[int, int], np.ndarray]:
        """The valid rows already on disk; damaged files are deleted (and then recomputed)."""
        rows, damaged = {}, []
        for key, path in files.items():
            if not path.exists():
                continue
            if shape is None:  # no meta.json yet (a pass killed before its first batch): recomputed, not judged
                continue
            row = _read_row(path, int(np.prod(shape)), self.dtype)
            if row is None:
                damaged.append(path)
            else:
                rows[key] = row
        if damaged:
            log.warning(
                "feature cache %s: %d damaged entr(ies) discarded and recomputed, e.g. %s", self.folder, len(damaged), damaged[0]
            )
            for path in damaged:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:  # a read-only cache: the entry is skipped in memory, this run stores nothing
                    self.writable = False
                    log.warning(
                        "feature cache %s is not writable (%s); features stay in memory for this run", self.folder, exc.strerror
                    )
                    break
        return rows

    def features(
        self, tap: Tap, paths: Sequence[str], pipeline: A.Compose, options: ComputeOptions
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(images x views x dim) features for `paths`, computing only what the cache lacks."""
        keys = [file_key(p) for p in progress_bar(paths, desc="hash images", disable=not options.progress, leave=False)]
        views = max(self.views, 1)
        files = {(i, v): self._file(keys[i], v) for i in range(len(paths)) for v in range(views)}
        shape = self._shape()
        rows = self._cached_rows(files, shape)
        missing = [key for key in files if key not in rows]
        if missing:
            seeds = [int(_digest(str(self.seed), keys[i], str(v))[:8], 16) if self.views else -1 for i, v in missing]
            jobs = [(paths[i], s) for (i, _), s in zip(missing, seeds)]
            computed, shape = self._compute(tap, jobs, [files[key] for key in missing], pipeline, options)
            rows.update(zip(missing, computed))
        log.info("feature cache %s: %d view(s) computed, %d reused", self.folder, len(missing), len(files) - len(missing))
        if shape is None:
            raise RuntimeError(f"feature cache {self.folder}: no shape for an empty set of images")
        stacked = np.stack([rows[key] for key in files])
        return torch.from_numpy(stacked).view(len(paths), views, -1), shape

    def _store(self, path: Path, row: np.ndarray) -> None:
        if not self.writable:
            return
        try:
            atomic_write(path, _save_row(row))
        except OSError as exc:
            self.writable = False
            log.warning("feature cache %s is not writable (%s); features stay in memory for this run", self.folder, exc.strerror)

    @torch.inference_mode()
    def _compute(
        self, tap: Tap, jobs: list[tuple[str, int]], files: list[Path], pipeline: A.Compose, options: ComputeOptions
    ) -> tuple[list[np.ndarray], tuple[int, ...]]:
        """Rows for `jobs` (stored in `files` when the cache is writable) and the shape of one feature."""
        loader = torch.utils.data.DataLoader(
            _Views(jobs, pipeline), batch_size=options.batch_size, num_workers=options.num_workers
        )
        rows: list[np.ndarray] = [np.empty(0, self.dtype)] * len(jobs)
        shape: tuple[int, ...] = ()
        with tap.evaluating():
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
                for row, index in zip(stored, indices.tolist()):
                    rows[index] = np.ascontiguousarray(row)
                    self._store(files[index], rows[index])
        return rows, shape

    def _write_meta(self, shape: tuple[int, ...]) -> None:
        if self.writable and self._shape() != shape:
            # the versions are already in the folder's name; written here so a person can tell what made the entries
            meta = {"shape": list(shape), "versions": library_versions(DECODING_LIBRARIES)}
            text = json.dumps(meta, sort_keys=True).encode("utf-8")
            with contextlib.suppress(OSError):  # without meta.json the entries are recomputed next time: slower, never wrong
                atomic_write(self.folder / "meta.json", lambda handle: handle.write(text))
