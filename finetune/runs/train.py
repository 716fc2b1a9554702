"""`finetune train`: a new run, or `--resume` of an interrupted one, ending with the report on the untouched split."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from finetune.config.loading import load_recipe, read_yaml, recipe_from_dict, save_recipe
from finetune.config.schema import Recipe
from finetune.data.loader import ImageDataset
from finetune.data.split import DatasetIndex
from finetune.data.transforms import save_pipeline
from finetune.errors import RunDirError, UsageError
from finetune.reporting.report import Report
from finetune.run_dir import RunDir
from finetune.runs.evaluate import report_for_run
from finetune.runs.prepare import PreparedData, PreparedModel, check_cheap_things, prepare_data, prepare_model
from finetune.training.checkpoint import load_checkpoint
from finetune.training.distributed import Ranks, barrier, setup, teardown
from finetune.training.history import read_history, truncate_history
from finetune.training.loop import FitContext, FitState, fit
from finetune.training.loss import class_weights

log = logging.getLogger(__name__)
RESUME_FREE = {"data.num_workers"}  # settings a resumed run may change without changing its result


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    history: pd.DataFrame
    report: Report | None  # None on torchrun ranks other than 0 (rank 0 writes the report)
    seconds: float


@dataclass
class _Start:
    """What a new or resumed run trains from."""

    recipe: Recipe
    index: DatasetIndex
    model: PreparedModel
    state: FitState | None
    ranks: Ranks


def resolve_recipe(
    recipe: Recipe | str | Path | None, *, overrides: Sequence[str] = (), data: str | Path | None = None
) -> Recipe:
    """A validated recipe from a file or a Recipe, with `--set` overrides and `--data` applied."""
    if recipe is None:
        raise UsageError("train needs a recipe (e.g. recipes/quickstart.yaml), or resume=True with an existing run")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides=overrides)
    elif overrides:
        recipe = recipe_from_dict(recipe.to_dict(), overrides=overrides)
    return recipe.with_data(data) if data is not None else recipe


def refuse_used_folder(run: RunDir) -> None:
    """Never overwrite work: a finished or running run is resumed, anything else needs a new folder."""
    if run.root.exists() and any(run.root.iterdir()):
        if run.last.exists():
            raise RunDirError(f"{run.root} already holds a run; continue it with --resume {run.root} or choose another --out")
        if not run.is_run():
            raise RunDirError(f"output folder {run.root} is not empty; choose a new --out folder")
        log.info("%s holds a run that never finished an epoch; starting it again", run.root)


def write_run_files(run: RunDir, recipe: Recipe, data: PreparedData) -> None:
    """splits, classes, skipped and leaked files; recipe.yaml last, atomically: a folder with recipe.yaml can be resumed."""
    run.root.mkdir(parents=True, exist_ok=True)
    data.skipped.to_csv(run.skipped, index=False)
    if len(data.leaks):
        data.leaks.to_csv(run.leakage, index=False)
    data.index.samples.to_csv(run.splits, index=False)
    run.classes.write_text(json.dumps(data.index.class_names, indent=1), encoding="utf-8")
    save_recipe(recipe, run.recipe)


def _start_new(run: RunDir, recipe: Recipe, *, progress: bool) -> _Start:
    ranks = setup(recipe.train.device)
    refuse_used_folder(run)
    check_cheap_things(recipe)
    data = prepare_data(recipe, progress=progress and ranks.main)
    model = prepare_model(recipe, num_classes=len(data.index.class_names))
    barrier()  # every rank has checked the folder and the data before rank 0 writes
    if ranks.main:
        write_run_files(run, recipe, data)
    return _Start(recipe=recipe, index=data.index, model=model, state=None, ranks=ranks)


def read_run(run: RunDir) -> tuple[Recipe, DatasetIndex, dict[str, Any] | None]:
    """The run's recipe, split and last checkpoint (None when it was stopped inside its first epoch)."""
    for path in (run.recipe, run.splits, run.classes):
        if not path.exists():
            raise RunDirError(
                f"cannot resume {run.root}: {path.name} is missing, so it is no finetune run folder; start a new run instead"
            )
    recipe = recipe_from_dict(read_yaml(run.recipe), source=str(run.recipe))
    samples = pd.read_csv(run.splits, dtype=str, keep_default_na=False)
    index = DatasetIndex(samples=samples, class_names=[str(c) for c in json.loads(run.classes.read_text(encoding="utf-8"))])
    return recipe, index, load_checkpoint(run.last) if run.last.exists() else None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def refuse_changed_recipe(stored: Recipe, recipe: Recipe | str | Path | None, overrides: Sequence[str], run: RunDir) -> None:
    """--resume with a recipe: it must be the run's own (up to settings that do not change results)."""
    if recipe is None:
        candidate = recipe_from_dict(stored.to_dict(), overrides=overrides)
    else:
        candidate = resolve_recipe(recipe, overrides=overrides).with_data(stored.data.path)
    old, new = _flatten(stored.to_dict()), _flatten(candidate.to_dict())
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_FREE)
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
        raise RunDirError(
            f"--resume {run.root}: the recipe differs from the run's ({shown}); resume without a recipe, or start a new run"
        )


def _start_resume(run: RunDir, recipe: Recipe | str | Path | None, overrides: Sequence[str]) -> _Start:
    stored, index, payload = read_run(run)
    if recipe is not None or overrides:
        refuse_changed_recipe(stored, recipe, overrides, run)
    ranks = setup(stored.train.device)
    state = FitState.from_payload(payload) if payload is not None else None
    if ranks.main:
        truncate_history(run, after_epoch=state.epoch if state else 0)
    model = prepare_model(stored, num_classes=len(index.class_names), load_pretrained=payload is None)
    if payload is not None:
        model.bundle.model.load_state_dict(payload["state_dict"])
    log.info("resuming %s after epoch %d", run.root, state.epoch if state else 0)
    return _Start(recipe=stored, index=index, model=model, state=state, ranks=ranks)


def _fit_context(run: RunDir, start: _Start, *, progress: bool, on_epoch_end: Callable[[FitState], None] | None) -> FitContext:
    """Datasets, loss weights and the pipelines' files for `fit`."""
    recipe, index, model = start.recipe, start.index, start.model
    train_rows, val_rows = index.split("train"), index.split("val")
    weights = class_weights(recipe.loss, class_names=index.class_names, targets=index.targets(train_rows))
    if start.ranks.main:
        save_pipeline(model.train_pipeline, run.train_transforms)
        save_pipeline(model.eval_pipeline, run.eval_transforms)
        if weights is not None:
            run.class_weights.write_text(json.dumps(dict(zip(index.class_names, weights)), indent=1), encoding="utf-8")
    log.info(
        "training %s on %d images (%d val) of %d classes -> %s",
        recipe.model.name,
        len(train_rows),
        len(val_rows),
        len(index.class_names),
        run.root,
    )
    return FitContext(
        recipe=recipe,
        class_names=index.class_names,
        image=model.image,
        run=run,
        class_weights=weights,
        progress=progress,
        on_epoch_end=on_epoch_end,
        train_set=ImageDataset(train_rows["path"], index.targets(train_rows), model.train_pipeline),
        val_set=ImageDataset(val_rows["path"], index.targets(val_rows), model.eval_pipeline),
    )


def train(
    *,
    recipe: Recipe | str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[FitState], None] | None = None,
) -> TrainResult:
    """Fine-tune per `recipe` on `data`, writing the run folder `out`; `resume=True` continues `out`.

    Under `torchrun --nproc_per_node=N` every process calls this; they train data-parallel and rank 0 writes.
    """
    started = time.perf_counter()
    run = RunDir(Path(out))
    if resume:
        start = _start_resume(run, recipe, overrides)
    else:
        start = _start_new(run, resolve_recipe(recipe, overrides=overrides, data=data), progress=progress)
    progress = progress and start.ranks.main
    try:
        fit(start.model.bundle, _fit_context(run, start, progress=progress, on_epoch_end=on_epoch_end), state=start.state)
    finally:
        teardown()
    report = report_for_run(run, start.index, progress=progress) if start.ranks.main else None
    history = read_history(run) if start.ranks.main else pd.DataFrame()
    return TrainResult(
        run_dir=run.root, best_checkpoint=run.best, history=history, report=report, seconds=time.perf_counter() - started
    )
