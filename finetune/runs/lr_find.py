"""`finetune lr-find`: the range test for a recipe's first phase, on the same screened data `train` would use.

A phase that trains on cached features in `train` (a frozen prefix: linear_probe, last_stage) does so here too: the
range test steps the trainable suffix over the same cache entries, so it costs about one caching pass (which the
training run then reuses) instead of `steps` forward passes through the whole frozen backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from finetune.config.loading import load_recipe
from finetune.config.schema import PhaseConfig, Recipe
from finetune.data.loader import ImageDataset, make_loader
from finetune.files import default_cache_dir, write_table
from finetune.inference.device import autocast_dtype, resolve_device
from finetune.inference.task import DEFAULT_TASK, TASKS, MultiLabel
from finetune.models.stages import set_train_mode
from finetune.reporting.plots import plot_lr_curve
from finetune.run_dir import check_destination
from finetune.runs.prepare import PreparedRun, prepare_run
from finetune.training.feature_cache import phase_cache
from finetune.training.loss import build_criterion
from finetune.training.lr_find import lr_range_test, suggest_lr, unreliable
from finetune.training.phase import set_up_phase
from finetune.training.seeding import epoch_seed, seed_epoch

log = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    curve: pd.DataFrame  # lr, loss (raw), smoothed
    suggestion: float
    folder: Path
    warning: str | None = None  # why the suggestion may be unreliable (logged once, as a warning)
    cached: bool = False  # the range test ran on the frozen prefix's cached outputs, as training's phase would


def find_lr(
    *,
    recipe: str | Path,
    data: str | Path | None,
    out: str | Path,
    overrides: Sequence[str] = (),
    steps: int = 100,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> LRFindResult:
    """Range test for the recipe's first phase on its training split; writes lr_find.csv and lr_find.png into `out`.

    `cache_dir` holds the feature caches, as for `train` (default: `default_cache_dir()`)."""
    check_destination(out)
    loaded = load_recipe(recipe, overrides=overrides)
    if data is not None:
        loaded = loaded.with_data(data)
    prepared = prepare_run(loaded, progress=progress)
    phase = loaded.train.resolved_phases()[0]
    device = resolve_device(loaded.train.device)
    bundle = prepared.model.bundle
    bundle.model.to(device)
    setup = set_up_phase(bundle, phase, loaded.train)  # as training's first phase sets itself up
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    net, dataset, cached = _inputs(prepared, loaded, phase, device=device, progress=progress, root=root)
    loader = make_loader(
        dataset,
        batch_size=loaded.data.batch_size,
        num_workers=0 if cached else loaded.data.num_workers,
        shuffle=True,
        seed=loaded.seed,
        drop_lone_last=setup.lone_batch_fails,
    )
    set_train_mode(bundle.model, setup.plan, bundle.stages)
    task = TASKS[MultiLabel.name if prepared.data.index.multilabel else DEFAULT_TASK]  # BCE for several labels per image
    criterion = build_criterion(loaded.loss, prepared.class_weights, task=task).to(device)
    seed_epoch(loaded.seed, 1)  # dropout draws as training's first epoch, whether or not a caching pass ran before
    curve = lr_range_test(
        net, loader, setup.optimizer, criterion, device=device, start_lr=start_lr, end_lr=end_lr, steps=steps, progress=progress
    )
    suggestion = suggest_lr(curve)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_table(curve, out / "lr_find.csv", float_format="%.6g")
    plot_lr_curve(curve, suggestion, out / "lr_find.png")
    log.info("lr-find: %d steps, suggested lr %.3g (the recipe's first phase has %.3g)", len(curve), suggestion, phase.lr)
    warning = unreliable(curve)
    if warning:
        log.warning("lr-find: %s", warning)
    return LRFindResult(curve=curve, suggestion=suggestion, folder=out, warning=warning, cached=cached)


def _inputs(
    prepared: PreparedRun, recipe: Recipe, phase: PhaseConfig, *, device: torch.device, progress: bool, root: Path
) -> tuple[nn.Module, torch.utils.data.Dataset, bool]:
    """(network, what it steps over, cached?): the trainable suffix on the frozen prefix's cached outputs when
    training's phase would use them (the views its first epoch picks), else the whole model on images."""
    index, model = prepared.data.index, prepared.model
    train_rows, val_rows = index.split("train"), index.split("val")
    train_set = ImageDataset(train_rows["path"], index.targets(train_rows), model.train_pipeline)
    val_set = ImageDataset(val_rows["path"], index.targets(val_rows), model.eval_pipeline)
    cached = phase_cache(
        model.bundle,
        recipe,
        phase,
        train_set=train_set,
        val_set=val_set,
        device=device,
        # training's precision (unchecked: lr-find takes no first-batch check): the same cache entries
        dtype=autocast_dtype(recipe.train.amp, device, side=model.image.input_size),
        distributed=False,
        progress=progress,
        root=root,
    )
    if cached is None:
        return model.bundle.model, train_set, False
    cached.train.choose_views(epoch_seed(recipe.seed, 1))
    log.info(
        "lr-find: stepping %s on cached inputs of %s (the frozen stages do not run per step)",
        ", ".join(phase.trainable_stages()),
        cached.first,
    )
    return cached.head, cached.train, True
