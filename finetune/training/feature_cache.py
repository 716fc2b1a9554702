"""Pooled backbone features cached on disk, so a head-only phase costs one backbone pass, then seconds per epoch.

A phase qualifies when only `head` trains and BatchNorm is frozen: the backbone is then a fixed
function, and its output for an image depends only on (image bytes, backbone weights, pipeline).
Those three hashes name the cache entry, so a change to any of them is a miss, never a stale hit.
With `cache_views: K` each image gets K augmented views of the train pipeline (view v is drawn
with a seed from the image hash and v), and every epoch picks one view per image.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import albumentations as A
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.config.schema import PhaseConfig, Recipe
from finetune.data.decode import load_image
from finetune.files import atomic_write
from finetune.models.build import ModelBundle

log = logging.getLogger(__name__)


def why_not_cached(recipe: Recipe, phase: PhaseConfig, *, distributed: bool) -> str | None:
    """None when `phase` can train on cached features, else the reason (logged for the user)."""
    if distributed and recipe.cache_blocker(phase) is None:
        return "feature caching is single-process"
    return recipe.cache_blocker(phase)


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


def backbone_key(bundle: ModelBundle, dtype: torch.dtype | None) -> str:
    """Hash of the architecture and every backbone tensor (the head is excluded: it is what trains)."""
    stages = bundle.stages.of_tensor
    parts: list[bytes | str] = [type(bundle.model).__name__, str(dtype)]
    for name, tensor in sorted(bundle.model.state_dict().items()):
        if stages.get(name) != "head":
            parts += [name, tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()]
    return _digest(*parts)


def pipeline_key(pipeline: A.Compose, *, seed: int | None) -> str:
    """Hash of albumentations' own serialization of the pipeline (plus the seed for augmented views)."""
    return _digest(json.dumps(A.to_dict(pipeline), sort_keys=True, default=str), str(seed))


def file_key(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FeatureSet(torch.utils.data.Dataset):
    """(feature, target) pairs from an (images x views x dim) tensor; `choose_views` picks a view per image."""

    def __init__(self, features: torch.Tensor, targets: Sequence[int]) -> None:
        self.features = features
        self.targets = list(targets)
        self.transform = None  # nothing random to seed: make_loader looks for one
        self.views = torch.zeros(len(self.targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.features[index, self.views[index]], self.targets[index]

    def choose_views(self, seed: int) -> None:
        if self.features.size(1) > 1:
            generator = torch.Generator().manual_seed(seed)
            self.views = torch.randint(self.features.size(1), (len(self.targets),), generator=generator)


class HeadOnFeatures(nn.Module):
    """The model's own classifier module applied to cached classifier inputs (same parameters, no copy)."""

    def __init__(self, head: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.head = head
        self.shape = shape

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.view(features.size(0), *self.shape)).flatten(1)


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


def _read_row(path: Path, size: int) -> np.ndarray | None:
    """A cached feature row, or None when the file is truncated, not a .npy, of another size or not finite."""
    try:
        row = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    good = isinstance(row, np.ndarray) and row.dtype == np.float32 and row.shape == (size,) and bool(np.isfinite(row).all())
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
            row = _read_row(path, int(np.prod(shape))) if shape else None
            if row is None:
                damaged.append(path)
            else:
                rows[key] = row
        if damaged:
            log.warning(
                "feature cache %s: %d damaged entr(ies) discarded and recomputed, e.g. %s", self.folder, len(damaged), damaged[0]
            )
            for path in damaged:
                path.unlink(missing_ok=True)
        return rows

    def features(
        self, bundle: ModelBundle, paths: Sequence[str], pipeline: A.Compose, options: ComputeOptions
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(images x views x dim) features for `paths`, computing only what the cache lacks."""
        keys = [file_key(p) for p in tqdm(paths, desc="hash images", disable=not options.progress, leave=False)]
        views = max(self.views, 1)
        files = {(i, v): self._file(keys[i], v) for i in range(len(paths)) for v in range(views)}
        shape = self._shape()
        rows = self._cached_rows(files, shape)
        missing = [key for key in files if key not in rows]
        if missing:
            seeds = [int(_digest(str(self.seed), keys[i], str(v))[:8], 16) if self.views else -1 for i, v in missing]
            jobs = [(paths[i], s) for (i, _), s in zip(missing, seeds)]
            computed, shape = self._compute(bundle, jobs, [files[key] for key in missing], pipeline, options)
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
        self, bundle: ModelBundle, jobs: list[tuple[str, int]], files: list[Path], pipeline: A.Compose, options: ComputeOptions
    ) -> tuple[list[np.ndarray], tuple[int, ...]]:
        """Rows for `jobs` (stored in `files` when the cache is writable) and the shape of one feature."""
        captured: list[torch.Tensor] = []
        hook = bundle.head.register_forward_hook(lambda module, args, output: captured.append(args[0]))
        loader = torch.utils.data.DataLoader(
            _Views(jobs, pipeline), batch_size=options.batch_size, num_workers=options.num_workers
        )
        was_training = bundle.model.training
        bundle.model.eval()
        rows: list[np.ndarray] = [np.empty(0, np.float32)] * len(jobs)
        shape: tuple[int, ...] = ()
        try:
            for images, indices in tqdm(loader, desc="cache features", disable=not options.progress, leave=False):
                captured.clear()
                with torch.autocast(options.device.type, dtype=options.dtype, enabled=options.dtype is not None):
                    bundle.model(images.to(options.device))
                batch = captured[0].float().cpu()
                shape = tuple(batch.shape[1:])
                for row, index in zip(batch.flatten(1).numpy(), indices.tolist()):
                    rows[index] = np.ascontiguousarray(row)
                    self._store(files[index], rows[index])
        finally:
            hook.remove()
            bundle.model.train(was_training)
        self._write_meta(shape)
        return rows, shape

    def _write_meta(self, shape: tuple[int, ...]) -> None:
        if self.writable and self._shape() != shape:
            text = json.dumps({"shape": list(shape)}).encode("utf-8")
            with contextlib.suppress(OSError):  # without meta.json the entries are recomputed next time: slower, never wrong
                atomic_write(self.folder / "meta.json", lambda handle: handle.write(text))


def _eval_cache(model_key: str, eval_pipeline: A.Compose, root: Path) -> FeatureCache:
    """The cache of one backbone's features through the (deterministic) eval pipeline."""
    return FeatureCache(root / f"{model_key}-{pipeline_key(eval_pipeline, seed=None)[:24]}", views=0)


@dataclass
class CachedPhase:
    """What a head-only phase trains and validates on instead of images."""

    train: FeatureSet
    val: FeatureSet
    head: HeadOnFeatures


def cached_phase(
    bundle: ModelBundle,
    recipe: Recipe,
    *,
    train_paths: Sequence[str],
    train_targets: Sequence[int],
    val_paths: Sequence[str],
    val_targets: Sequence[int],
    train_pipeline: A.Compose,
    eval_pipeline: A.Compose,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
    root: Path,
) -> CachedPhase:
    """Features for the train split (K views, or the eval pipeline) and the val split (eval pipeline), cached under `root`."""
    model_key = backbone_key(bundle, dtype)[:24]
    views = recipe.train.cache_views if recipe.transforms.train != "none" else 0  # the eval pipeline has one view
    options = ComputeOptions(
        device=device, dtype=dtype, batch_size=recipe.data.batch_size, num_workers=recipe.data.num_workers, progress=progress
    )
    eval_cache = _eval_cache(model_key, eval_pipeline, root)
    if views:
        train_cache = FeatureCache(
            root / f"{model_key}-{pipeline_key(train_pipeline, seed=recipe.seed)[:24]}-k{views}", views=views, seed=recipe.seed
        )
        train_features, shape = train_cache.features(bundle, train_paths, train_pipeline, options)
    else:
        train_features, shape = eval_cache.features(bundle, train_paths, eval_pipeline, options)
    val_features, _ = eval_cache.features(bundle, val_paths, eval_pipeline, options)
    head = HeadOnFeatures(bundle.head, shape)
    return CachedPhase(train=FeatureSet(train_features, train_targets), val=FeatureSet(val_features, val_targets), head=head)


def pooled_features(
    bundle: ModelBundle, paths: Sequence[str], eval_pipeline: A.Compose, *, options: ComputeOptions, root: Path
) -> np.ndarray:
    """The classifier's input (pooled backbone features) for every image through the eval pipeline, as N x dim;
    the same cache entries a head-only phase of this backbone uses."""
    cache = _eval_cache(backbone_key(bundle, options.dtype)[:24], eval_pipeline, root)
    features, _ = cache.features(bundle, paths, eval_pipeline, options)
    return features.flatten(1).numpy()
