"""What a partly frozen phase trains on instead of images: the output of its frozen prefix, cached.

A phase qualifies when its trainable stages are a suffix of the network (head; layer4 + head; ...) and the frozen
stages keep their BatchNorm statistics: the prefix is then a fixed function, and its output for an image depends
only on (image bytes, prefix weights, pipeline), the names of the cache entries. Head-only phases cache the pooled
features (the head stage's input, float32: the classifier's, or for a family whose head stage holds more, such as
ConvNeXt's head.norm, the first of those modules'); longer suffixes cache the activation entering their first stage
(`train.cache_precision`, float16 by default, within `train.cache_budget_gb`) and train the suffix on it. With
`cache_views: K` each image gets K augmented views of the train pipeline (view v is drawn with a seed from the
image hash and v), and every epoch picks one view per image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch import nn

from finetune.config.catalog import STAGES, Stage
from finetune.config.schema import PhaseConfig, Recipe
from finetune.data.decode import load_image
from finetune.data.loader import ImageDataset, Target
from finetune.data.members import split_member_path
from finetune.data.stream import ShardStream
from finetune.files import default_cache_dir
from finetune.inference.device import autocast_dtype, resolve_device
from finetune.models.build import ModelBundle
from finetune.models.suffix import SuffixNet, suffix_names
from finetune.training.feature_store import ComputeOptions, FeatureCache, FeatureSet, Tap, backbone_key, pipeline_key

log = logging.getLogger(__name__)
GIB = 1024**3


def why_not_cached(recipe: Recipe, phase: PhaseConfig, *, distributed: bool) -> str | None:
    """None when `phase` can train on cached features, else the reason (logged for the user)."""
    if distributed and recipe.cache_blocker(phase) is None:
        return "feature caching is single-process"
    return recipe.cache_blocker(phase)


class HeadOnFeatures(nn.Module):
    """The model's own head-stage modules (the classifier, after any the family runs on the pooled features before
    it) applied in order to cached pooled features (same parameters, no copy)."""

    def __init__(self, head: list[nn.Module], shape: tuple[int, ...]) -> None:
        super().__init__()
        self.head = nn.ModuleList(head)
        self.shape = shape

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.view(features.size(0), *self.shape).float()
        for module in self.head:
            x = module(x)
        return x.flatten(1)


def cached_modules(bundle: ModelBundle, first: Stage) -> list[str]:
    """The modules that run on the cache when `first` is the first stage that trains, in forward order."""
    if first == "head":
        return bundle.stages.family.head_modules(bundle.classifier)
    return suffix_names(bundle.stages, first)


def entry_module(bundle: ModelBundle, first: Stage) -> str:
    """The module whose input is cached when `first` is the first stage that trains."""
    return cached_modules(bundle, first)[0]


def feature_cache(
    bundle: ModelBundle,
    first: Stage,
    pipeline: A.Compose,
    *,
    views: int,
    seed: int,
    dtype: torch.dtype | None,
    root: Path,
    half: bool,
) -> FeatureCache:
    """The cache of the input of `first` through `pipeline`, named by the prefix weights and the pipeline."""
    name = f"{backbone_key(bundle, dtype, upto=first)[:24]}-{pipeline_key(pipeline, seed=seed if views else None)[:24]}"
    name += f"-k{views}" if views else ""
    stored = np.float16 if half and first != "head" else np.float32
    return FeatureCache(root / (name + ("-fp16" if stored == np.float16 else "")), views=views, seed=seed, dtype=stored)


@dataclass
class CachedPhase:
    """What a phase trains and validates on instead of images, and the network that reads it."""

    train: FeatureSet
    val: FeatureSet
    head: nn.Module  # HeadOnFeatures, or SuffixNet for a suffix longer than the head
    first: Stage
    shape: tuple[int, ...]

    def network(self, model: nn.Module, names: list[str]) -> nn.Module:
        """The same reader over `model` or another of the same architecture (the EMA's weights); `names`: the
        modules that run on the cache (`cached_modules`)."""
        return cache_reader(model, names, self.first, self.shape)


def cache_reader(model: nn.Module, names: list[str], first: Stage, shape: tuple[int, ...]) -> nn.Module:
    """The network that reads cached inputs of `first` of shape `shape`: the modules `names` of `model` in order."""
    if first == "head":
        return HeadOnFeatures([model.get_submodule(name) for name in names], shape)
    return SuffixNet(model, names, shape)


def _prefix_blocker(bundle: ModelBundle, tap: Tap, recipe: Recipe, first: Stage, image: torch.Tensor, rows: int) -> str | None:
    """Before any caching pass, on one image in fp32 (whatever the run's precision): None when the modules from
    `first` on the prefix's output give the whole model's logits (the forward is a plain chain of its stages) and
    `rows` such outputs fit `train.cache_budget_gb` (pooled features for the head are not counted); else why the
    cache is not used."""
    was_training = bundle.model.training
    bundle.model.eval()
    try:
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            activation = tap(image).float()
            rest = cache_reader(bundle.model, cached_modules(bundle, first), first, tuple(activation.shape[1:]))
            same = torch.allclose(bundle.model(image).float(), rest(activation.flatten(1)).float(), rtol=1e-4, atol=1e-4)
    finally:
        bundle.model.train(was_training)
    if not same:
        what = "head stage" if first == "head" else "stages"
        return f"{bundle.name}'s forward is not a plain chain of its {what}"
    if first == "head":
        return None
    size = rows * activation.numel() * (2 if recipe.train.cache_precision == "fp16" else 4)
    if size > recipe.train.cache_budget_gb * GIB:
        return (
            f"the prefix outputs would take {size / GIB:.1f} GiB, above train.cache_budget_gb: {recipe.train.cache_budget_gb:g}"
        )
    return None


def cached_phase(
    bundle: ModelBundle,
    recipe: Recipe,
    *,
    first: Stage = "head",
    train_paths: Sequence[str],
    train_targets: Sequence[Target],
    val_paths: Sequence[str],
    val_targets: Sequence[Target],
    train_pipeline: A.Compose,
    eval_pipeline: A.Compose,
    device: torch.device,
    dtype: torch.dtype | None,
    progress: bool,
    root: Path,
) -> CachedPhase | None:
    """The input of stage `first` for the train split (K views, or the eval pipeline) and the val split (eval
    pipeline), cached under `root`; None (said in the log) when it would not fit the budget or not reproduce the model."""
    views = recipe.train.cache_views if recipe.transforms.train != "none" else 0  # the eval pipeline has one view
    options = ComputeOptions(
        device=device, dtype=dtype, batch_size=recipe.data.batch_size, num_workers=recipe.data.num_workers, progress=progress
    )
    tap = Tap(bundle.model, entry_module(bundle, first))
    image = eval_pipeline(image=load_image((val_paths or train_paths)[0]))["image"].unsqueeze(0).to(device)
    reason = _prefix_blocker(bundle, tap, recipe, first, image, len(train_paths) * max(views, 1) + len(val_paths))
    if reason:
        log.info("feature cache not used: %s", reason)
        return None
    half = recipe.train.cache_precision == "fp16"
    # validation runs in fp32 whatever the training's autocast (as the uncached path, evaluate and the report do)
    eval_cache = feature_cache(bundle, first, eval_pipeline, views=0, seed=recipe.seed, dtype=None, root=root, half=half)
    train_cache = feature_cache(
        bundle,
        first,
        train_pipeline if views else eval_pipeline,
        views=views,
        seed=recipe.seed,
        dtype=dtype,
        root=root,
        half=half,
    )
    train_features, shape = train_cache.features(tap, train_paths, train_pipeline if views else eval_pipeline, options)
    val_features, _ = eval_cache.features(tap, val_paths, eval_pipeline, replace(options, dtype=None))
    cached = CachedPhase(
        FeatureSet(train_features, train_targets), FeatureSet(val_features, val_targets), nn.Identity(), first, shape
    )
    cached.head = cached.network(bundle.model, cached_modules(bundle, first))
    return cached


def phase_cache(
    bundle: ModelBundle,
    recipe: Recipe,
    phase: PhaseConfig,
    *,
    train_set: ImageDataset | ShardStream,
    val_set: ImageDataset,
    device: torch.device,
    dtype: torch.dtype | None,
    distributed: bool,
    progress: bool,
    root: Path,
) -> CachedPhase | None:
    """The cached inputs `phase` trains on when it can (`why_not_cached`), else None with the reason in the log; what
    training's phases and lr-find both use, so lr-find fills the very entries training then reuses."""
    reason = why_not_cached(recipe, phase, distributed=distributed)
    if reason is None and (not train_set.paths or split_member_path(train_set.paths[0]) is not None):
        reason = "the images are in shards (the caches keep an entry per image file)"  # streamed, or read inside a tar
    if reason is not None:
        if phase.trainable_stages() != STAGES:  # every stage training needs no explanation
            log.info("feature cache not used: %s", reason)
        return None
    return cached_phase(
        bundle,
        recipe,
        first=phase.trainable_stages()[0],
        train_paths=train_set.paths,
        train_targets=train_set.targets,
        val_paths=val_set.paths,
        val_targets=val_set.targets,
        train_pipeline=train_set.transform,
        eval_pipeline=val_set.transform,
        device=device,
        dtype=dtype,
        progress=progress,
        root=root,
    )


def pooled_features(
    bundle: ModelBundle, paths: Sequence[str], eval_pipeline: A.Compose, *, options: ComputeOptions, root: Path
) -> np.ndarray:
    """The classifier's input (pooled backbone features) for every image through the eval pipeline, as N x dim;
    the same cache entries a head-only phase of this backbone uses."""
    cache = feature_cache(bundle, "head", eval_pipeline, views=0, seed=0, dtype=options.dtype, root=root, half=False)
    features, _ = cache.features(Tap(bundle.model, entry_module(bundle, "head")), paths, eval_pipeline, options)
    return features.flatten(1).numpy()


def recipe_features(
    bundle: ModelBundle, paths: Sequence[str], eval_pipeline: A.Compose, recipe: Recipe, *, progress: bool, cache_dir: Path | None
) -> np.ndarray:
    """`pooled_features` computed as the recipe says (its device, precision, batch size and workers), cached in
    `cache_dir` (default: the user's feature cache): what the label audit's outliers and the labeling queue use."""
    device = resolve_device(recipe.train.device)
    bundle.model.to(device)
    options = ComputeOptions(
        device=device,
        dtype=autocast_dtype(recipe.train.amp, device, side=recipe.transforms.input_size),
        batch_size=recipe.data.batch_size,
        num_workers=recipe.data.num_workers,
        progress=progress,
    )
    return pooled_features(bundle, paths, eval_pipeline, options=options, root=cache_dir or default_cache_dir())
