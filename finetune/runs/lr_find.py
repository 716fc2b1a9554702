"""`finetune lr-find`: the range test for a recipe's first phase, on the same screened data `train` would use."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.config.loading import load_recipe
from finetune.data.loader import ImageDataset, make_loader
from finetune.files import check_writable_folder, write_table
from finetune.inference.device import resolve_device
from finetune.models.stages import set_train_mode
from finetune.reporting.plots import plot_lr_curve
from finetune.runs.prepare import prepare_run
from finetune.training.loss import build_criterion
from finetune.training.lr_find import lr_range_test, suggest_lr, unreliable
from finetune.training.phase import set_up_phase

log = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    curve: pd.DataFrame  # lr, loss (raw), smoothed
    suggestion: float
    folder: Path
    warning: str | None = None  # why the suggestion may be unreliable


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
) -> LRFindResult:
    """Range test for the recipe's first phase on its training split; writes lr_find.csv and lr_find.png into `out`."""
    check_writable_folder(Path(out))
    loaded = load_recipe(recipe, overrides=overrides)
    if data is not None:
        loaded = loaded.with_data(data)
    prepared = prepare_run(loaded, progress=progress)
    bundle, index = prepared.model.bundle, prepared.data.index
    rows = index.split("train")
    dataset = ImageDataset(rows["path"], index.targets(rows), prepared.model.train_pipeline)
    phase = loaded.train.resolved_phases()[0]
    device = resolve_device(loaded.train.device)
    model = bundle.model.to(device)
    setup = set_up_phase(bundle, phase, loaded.train)  # as training's first phase sets itself up
    cfg = loaded.data
    loader = make_loader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        shuffle=True,
        seed=loaded.seed,
        drop_lone_last=setup.lone_batch_fails,
    )
    set_train_mode(model, setup.plan, bundle.stages)
    optimizer = setup.optimizer
    criterion = build_criterion(loaded.loss, prepared.class_weights).to(device)
    curve = lr_range_test(
        model, loader, optimizer, criterion, device=device, start_lr=start_lr, end_lr=end_lr, steps=steps, progress=progress
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
    return LRFindResult(curve=curve, suggestion=suggestion, folder=out, warning=warning)
