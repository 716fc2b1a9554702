"""`finetune train`: a new run, or `--resume` of an interrupted one, ending with the report on the untouched split."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from finetune.config.loading import read_yaml, recipe_from_dict
from finetune.config.schema import Recipe
from finetune.data.doctor import ImageFacts
from finetune.data.loader import ImageDataset
from finetune.data.members import is_shard_folder
from finetune.data.shards import read_shard_set
from finetune.data.split import DatasetIndex, label_counts
from finetune.data.stream import SHUFFLE_BUFFER, ShardStream, check_shards_per_process
from finetune.data.transforms import save_pipeline
from finetune.errors import CheckpointError, DataError, RunDirError, UsageError
from finetune.evaluation.best_calibration import calibrate_best
from finetune.files import default_cache_dir, read_text_table, write_table, write_text
from finetune.inference.checkpoint import RESUMABLE_FROM, load_checkpoint
from finetune.inference.task import DEFAULT_TASK, TASKS, MultiLabel
from finetune.reporting.progress import Standing, write_progress
from finetune.reporting.report import Report
from finetune.reporting.run_report import report_for_run
from finetune.run_dir import RunDir, claim_output, locked, removed_if_unstarted, timestamped_run
from finetune.runs.prepare import (
    PreparedData,
    PreparedModel,
    QuickTry,
    changed_settings,
    prepare_model,
    prepare_run,
    refuse_changed_recipe,
    refuse_edited_since_start,
    resolve_recipe,
    run_name,
    save_run_recipe,
)
from finetune.training.distributed import Ranks, barrier, peers_watched, setup, teardown
from finetune.training.history import epoch_table, read_history, truncate_history
from finetune.training.loop import FitContext, FitState, fit
from finetune.training.loss import class_weights
from finetune.training.tracking import Trackers

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    history: pd.DataFrame
    report: Report | None  # None on torchrun ranks other than 0 (rank 0 writes the report)
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent preparing, training, reporting

    def where_the_time_went(self) -> str:
        """'data and model 2.1 s, training 14.0 s (5 epochs), report 3.0 s' for the end of a command."""
        parts = {"prepare": "data and model", "train": "training", "report": "calibration and report"}
        shown = [
            f"{parts.get(k, k)} {v:.1f} s" + (f" ({len(self.history)} epochs)" if k == "train" else "")
            for k, v in self.timings.items()
        ]
        return ", ".join(shown)


@dataclass
class _Start:
    """What a new or resumed run trains from."""

    recipe: Recipe
    index: DatasetIndex
    model: PreparedModel
    class_weights: list[float] | None
    state: FitState | None
    ranks: Ranks


def write_run_files(run: RunDir, recipe: Recipe, data: PreparedData) -> None:
    """splits, classes, skipped and leaked files; recipe.yaml last, atomically: a folder with recipe.yaml can be resumed."""
    run.root.mkdir(parents=True, exist_ok=True)
    write_table(data.skipped, run.skipped)
    if len(data.excluded):
        write_table(data.excluded, run.excluded)
    if len(data.leaks):
        write_table(data.leaks, run.leakage)
    write_table(data.index.samples, run.splits)
    classes: Any = data.index.class_names
    if data.index.multilabel:  # classes.json says the task: a resume before the first checkpoint reads it here
        classes = {"task": MultiLabel.name, "classes": data.index.class_names}
        write_table(label_counts(data.index), run.root / "label_counts.csv")
    write_text(run.classes, json.dumps(classes, indent=1))
    save_run_recipe(run, recipe)


def _start_new(
    run: RunDir, recipe: Recipe, ranks: Ranks, *, progress: bool, known: Mapping[str, ImageFacts] | None = None
) -> _Start:
    _check_shards_per_process(recipe, ranks)
    prepared = prepare_run(recipe, progress=progress and ranks.main, known=known)
    barrier()  # every rank has checked the data before rank 0 writes
    if ranks.main:
        write_run_files(run, recipe, prepared.data)
    return _Start(
        recipe=recipe,
        index=prepared.data.index,
        model=prepared.model,
        class_weights=prepared.class_weights,
        state=None,
        ranks=ranks,
    )


def read_run(run: RunDir) -> tuple[Recipe, DatasetIndex, dict[str, Any] | None]:
    """The run's recipe, split and last checkpoint (None when it was stopped inside its first epoch).

    The recipe is the checkpoint's own; a recipe.yaml edited since then is refused rather than trusted.
    """
    for path in (run.recipe, run.splits, run.classes):
        if not path.exists():
            raise RunDirError(
                f"cannot resume {run.root}: {path.name} is missing, so it is no finetune run folder; start a new run instead"
            )
    recipe = recipe_from_dict(read_yaml(run.recipe), source=str(run.recipe))
    payload = load_checkpoint(run.last) if run.last.exists() else None
    if payload is None:  # no checkpoint holds the recipe yet: the copy made at the start does
        refuse_edited_since_start(run, recipe)
    if payload is not None:
        if int(payload.get("format_version", 1)) < RESUMABLE_FROM:
            raise CheckpointError(
                f"cannot resume {run.root}: its last.pt was written by an older finetune (checkpoint format "
                f"{payload.get('format_version', 1)}); evaluate or predict with it, or start a new run"
            )
        stored = recipe_from_dict(payload["recipe"], source=f"stored in {run.last}")
        edits = changed_settings(stored, recipe)
        if edits:
            raise RunDirError(
                f"cannot resume {run.root}: recipe.yaml was edited after the last checkpoint ({edits}); "
                "put it back as it was, or start a new run with the edited recipe"
            )
        recipe = stored
    samples = read_text_table(run.splits)
    names, multilabel = run.class_names()
    index = DatasetIndex(samples=samples, class_names=names, multilabel=multilabel)
    return recipe, index, payload


def _start_resume(run: RunDir, stored: Recipe, index: DatasetIndex, payload: dict[str, Any] | None, ranks: Ranks) -> _Start:
    state = FitState.from_payload(payload) if payload is not None else None
    if ranks.main:
        truncate_history(run, after_epoch=state.epoch if state else 0)
    model = prepare_model(stored, num_classes=len(index.class_names), load_pretrained=payload is None)
    if payload is not None:
        model.bundle.model.load_state_dict(payload["state_dict"])
    weights = class_weights(stored.loss, class_names=index.class_names, targets=index.targets(index.split("train")))
    if state is not None and state.finished:
        log.info("%s had finished all its epochs (%d): only calibration and the report are done again", run.root, state.epoch)
    else:
        log.info("resuming %s after epoch %d", run.root, state.epoch if state else 0)
    return _Start(recipe=stored, index=index, model=model, class_weights=weights, state=state, ranks=ranks)


def write_training_files(run: RunDir, start: _Start) -> None:
    """The pipelines as albumentations serialises them, and the loss's class weights."""
    save_pipeline(start.model.train_pipeline, run.train_transforms)
    save_pipeline(start.model.eval_pipeline, run.eval_transforms)
    if start.class_weights is not None:
        write_text(run.class_weights, json.dumps(dict(zip(start.index.class_names, start.class_weights)), indent=1))


def _fit_context(
    run: RunDir, start: _Start, *, progress: bool, on_epoch_end: Callable[[FitState], None] | None, cache_dir: str | Path | None
) -> FitContext:
    """The training and validation datasets, and everything else `fit` reads."""
    recipe, index, model = start.recipe, start.index, start.model
    train_rows, val_rows = index.split("train"), index.split("val")
    keep = recipe.data.keep_decoded_mb / 2 if recipe.data.num_workers == 0 else 0.0  # half for each split
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
        class_weights=start.class_weights,
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        progress=progress,
        on_epoch_end=_live_view(run, recipe, _monitored(recipe, index), on_epoch_end) if start.ranks.main else on_epoch_end,
        train_set=_training_set(recipe, train_rows, index, model, keep_decoded_mb=keep),
        val_set=ImageDataset(val_rows["path"], index.targets(val_rows), model.eval_pipeline, keep_decoded_mb=keep),
        task=TASKS[MultiLabel.name if index.multilabel else DEFAULT_TASK],
    )


def _training_set(
    recipe: Recipe, rows: pd.DataFrame, index: DatasetIndex, model: PreparedModel, *, keep_decoded_mb: float
) -> ImageDataset | ShardStream:
    """The train split's images: files read in the sampler's order, or a shard folder's train shards streamed."""
    if not is_shard_folder(recipe.data.path):
        return ImageDataset(rows["path"], index.targets(rows), model.train_pipeline, keep_decoded_mb=keep_decoded_mb)
    shards = read_shard_set(Path(recipe.data.path or ""), verify=False)  # verified when the run started
    if shards.classes != index.class_names:
        raise DataError(f"{shards.root}: its classes {shards.classes} are not the run's {index.class_names}; shard it again")
    train = shards.of_split("train")
    log.info("streaming %d train shards from %s (shuffle buffer %d images)", len(train), shards.root, SHUFFLE_BUFFER)
    targets = [int(t) for t in index.targets(rows)]  # one class per image: shard refuses several labels per image
    return ShardStream(shards.paths("train"), [s.count for s in train], targets, model.train_pipeline)


def _check_shards_per_process(recipe: Recipe, ranks: Ranks) -> None:
    """Too few train shards for the torchrun job, refused before the run folder is written (every rank raises)."""
    if ranks.enabled and is_shard_folder(recipe.data.path):
        shards = read_shard_set(Path(recipe.data.path or ""), verify=False)
        check_shards_per_process(len(shards.of_split("train")), ranks.world)


def _standing(recipe: Recipe, state: FitState | None, *, metric: str, finished: bool = False) -> Standing:
    """What progress.html says of the run: epochs planned, the kept epoch (early stopping's best) and its metric."""
    kept = int((state.addons.get("stopping") or {}).get("best_epoch", 0)) if state is not None else 0
    total = sum(p.epochs for p in recipe.train.resolved_phases())
    return Standing(total_epochs=total, kept_epoch=kept or None, metric=metric, finished=finished)


def _monitored(recipe: Recipe, index: DatasetIndex) -> str:
    """The metric the run follows (the task's own for early_stopping.metric auto)."""
    return recipe.train.early_stopping.monitored(
        TASKS[MultiLabel.name if index.multilabel else DEFAULT_TASK].early_stopping_metric
    )


def _redraw(run: RunDir, standing: Standing) -> None:
    """progress.html and training_curves.png; a live view that cannot be written is a warning, never a stop."""
    try:
        write_progress(run, standing)
    except OSError as exc:
        log.warning("progress.html not updated (%s); training goes on", exc.strerror or exc)


def _live_view(run: RunDir, recipe: Recipe, metric: str, then: Callable[[FitState], None] | None) -> Callable[[FitState], None]:
    """The epoch-end callback of rank 0: redraw the live view, then call the caller's own callback."""

    def after_epoch(state: FitState) -> None:
        _redraw(run, _standing(recipe, state, metric=metric))
        if then is not None:
            then(state)

    return after_epoch


def _fit_and_report(run: RunDir, start: _Start, ctx: FitContext, timings: dict[str, float]) -> Report | None:
    """Train, then (rank 0) calibrate best.pt and write the report; every epoch and the report's figures also go to
    the recipe's trackers (TensorBoard, MLflow)."""
    first_epoch = start.state.epoch + 1 if start.state is not None else 1
    ctx.trackers = Trackers(start.recipe.log, run.root, first_epoch=first_epoch) if start.ranks.main else None
    try:
        begun = time.perf_counter()
        if start.ranks.main:
            _redraw(run, _standing(start.recipe, start.state, metric=ctx.monitored))  # a page before the first epoch ends
        state = fit(start.model.bundle, ctx, state=start.state)
        timings["train"] = time.perf_counter() - begun
        if not start.ranks.main:
            return None
        standing = _standing(start.recipe, state, metric=ctx.monitored, finished=True)
        _redraw(run, standing)
        log.info("\n%s", epoch_table(read_history(run), kept_epoch=standing.kept_epoch))
        begun = time.perf_counter()
        calibrate_best(run, start.recipe.eval)
        report = report_for_run(run, start.index, progress=ctx.progress)
        timings["report"] = time.perf_counter() - begun
        if ctx.trackers is not None:
            for name in ("confusion_matrix", "augmentation_preview", "training_curves"):
                ctx.trackers.figure(f"report/{name}", run.report / f"{name}.png", state.epoch)
            ctx.trackers.finish(start.recipe.to_dict(), _final_scores(report))
        return report
    finally:
        if ctx.trackers is not None:
            ctx.trackers.close()


def _final_scores(report: Report) -> dict[str, float]:
    """The report's headline numbers, named by the split they were measured on."""
    split = str(report.metrics.get("evaluated_on", {}).get("split", "eval"))
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "ece")
    return {f"{split}_{k}": float(report.metrics[k]) for k in keys if isinstance(report.metrics.get(k), (int, float))}


def _read_resumed(
    run: RunDir, recipe: Any, overrides: Sequence[str], data: str | Path | None, quick: QuickTry
) -> tuple[Recipe, DatasetIndex, dict[str, Any] | None]:
    """The run to continue, with any recipe, override, data or quick-try option checked against it."""
    if quick.given():
        raise UsageError(f"--resume continues {run.root} as it started; leave out {', '.join(quick.given())}")
    stored, index, payload = read_run(run)
    refuse_changed_recipe(stored, recipe, overrides, data, run)
    return stored, index, payload


def _claim_new(run: RunDir, recipe: Recipe) -> Recipe:
    """The output folder checked (and taken over when it holds a run stopped inside its first epoch)."""
    claim_output(run, marker=run.last, holds="run", restartable=True)
    if run.is_run():
        log.info("%s holds a run that never finished an epoch; starting it again", run.root)
    return recipe


def train(
    *,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    model: str | None = None,
    epochs: int | None = None,
    epochs_scale: float | None = None,
    max_epochs: int | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[FitState], None] | None = None,
    cache_dir: str | Path | None = None,
    known_images: Mapping[str, ImageFacts] | None = None,
) -> TrainResult:
    """Fine-tune per `recipe` on `data`, writing the run folder `out`; `resume=True` continues `out`.

    `recipe` is a YAML file, a built-in name ('last_stage'; `finetune recipes` lists them), a dict or a Recipe;
    without one, `data` trains the built-in last_stage. `model` swaps the backbone; `epochs` sets the run's epochs
    in all, `epochs_scale` multiplies every phase's and `max_epochs` caps them (phases change in proportion).
    `out` defaults to runs/RECIPE-TIME. `on_epoch_end(state)` runs after every epoch (metrics.csv has its row).

    Under `torchrun --nproc_per_node=N` every process calls this; they train data-parallel and rank 0 writes.
    `cache_dir` holds feature caches (default: `default_cache_dir()`, i.e. $FINETUNE_CACHE_DIR or ~/.cache).
    `known_images` are screening facts already gathered (cross-validation folds screen the images once).
    """
    started = time.perf_counter()
    quick = QuickTry(model=model, epochs=epochs, epochs_scale=epochs_scale, max_epochs=max_epochs)
    if out is None and resume:
        raise UsageError("resume=True continues a run folder: pass it as out")
    run = RunDir(Path(out) if out is not None else timestamped_run(run_name(recipe)))
    if resume:
        stored, index, payload = _read_resumed(run, recipe, overrides, data, quick)
        target = stored
    else:
        target = _claim_new(run, resolve_recipe(recipe, overrides=overrides, data=data, quick=quick))
    ranks = setup(target.train.device)
    try:
        barrier()  # every rank has looked at the folder before rank 0 locks it
        with peers_watched(ranks, run=run.root), removed_if_unstarted(run), locked(run, enabled=ranks.main):
            resumed = _start_resume(run, stored, index, payload, ranks) if resume else None
            start = resumed or _start_new(run, target, ranks, progress=progress, known=known_images)
            progress = progress and ranks.main
            if ranks.main:
                write_training_files(run, start)
            ctx = _fit_context(run, start, progress=progress, on_epoch_end=on_epoch_end, cache_dir=cache_dir)
            timings = {"prepare": time.perf_counter() - started}
            report = _fit_and_report(run, start, ctx, timings)
    finally:
        teardown()
    history = read_history(run) if ranks.main else pd.DataFrame()
    return TrainResult(
        run_dir=run.root,
        best_checkpoint=run.best,
        history=history,
        report=report,
        seconds=time.perf_counter() - started,
        timings=timings,
    )
