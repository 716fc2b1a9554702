"""Cross-validation: `finetune train --folds K` (and `compare --folds K`, `audit`).

K ordinary fold runs (RUN/fold_k/) share one screening pass and the feature cache. Fold k's val split is
fold k, so its best.pt already holds the predictions of a model that never trained on those images:
together they are the out-of-fold predictions of every image, reported in RUN/oof/ (confusion matrix,
per-class table, ...). RUN/cv_summary.csv has each fold's figures, their mean and standard deviation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.config.loading import load_recipe
from finetune.config.schema import Recipe
from finetune.data.doctor import ImageFacts, screen_samples
from finetune.data.facts import FactsCache
from finetune.data.folds import apply_exclude, assign_folds, fold_manifest
from finetune.data.scan import manifest_is_multilabel, read_samples
from finetune.data.split import multi_hot
from finetune.errors import CheckpointError, RunDirError, UsageError
from finetune.files import path_key, read_text_table, write_table, write_text
from finetune.inference.checkpoint import CheckpointRecord, read_record
from finetune.inference.predictions import Predictions
from finetune.reporting.html import RunContext
from finetune.reporting.markdown import markdown_table
from finetune.reporting.multilabel_report import write_multilabel_report
from finetune.reporting.report import Report, write_report
from finetune.run_dir import RunDir, claim_output, locked, removed_if_unstarted
from finetune.runs.prepare import (
    QuickTry,
    check_cheap_things,
    refuse_edited_since_start,
    resolve_recipe,
    save_run_recipe,
)
from finetune.runs.train import train

log = logging.getLogger(__name__)
FOLD_FIGURES = ("accuracy", "balanced_accuracy", "macro_f1")
MULTILABEL_FIGURES = ("mean_average_precision", "macro_f1", "subset_accuracy")  # several labels per image


@dataclass
class CVResult:
    run_dir: Path
    summary: pd.DataFrame  # one row per fold, then the rows 'mean' and 'std' (sample standard deviation)
    oof: Predictions  # every image outside the test split, predicted by the fold model that did not train on it
    class_names: list[str]
    report: Report  # RUN/oof
    facts: Mapping[str, ImageFacts]  # screening facts of every image (empty after a resume)
    seconds: float


def cross_validate(
    *,
    recipe: Recipe | dict[str, Any] | str | Path | None = None,
    data: str | Path | None = None,
    out: str | Path,
    folds: int = 5,
    overrides: Sequence[str] = (),
    model: str | None = None,
    epochs: int | None = None,
    epochs_scale: float | None = None,
    max_epochs: int | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    assignment: pd.DataFrame | None = None,
) -> CVResult:
    """Train `recipe` K times, each fold once the validation split; `resume=True` continues `out`. `model`, `epochs`,
    `epochs_scale` and `max_epochs` are train's quick-try options.

    Folds are stratified, seeded with the recipe's seed and keep `data.group_pattern` groups whole; a test split
    stays out of them. `assignment` (a folds.csv table) imposes the folds of another run (compare uses one set).
    """
    started = time.perf_counter()
    if folds < 2 and not resume:  # before any weights are fetched or images screened
        raise UsageError(f"--folds {folds}: cross-validation needs at least 2 folds (5 is usual)")
    run = RunDir(Path(out))
    facts: Mapping[str, ImageFacts] = {}
    quick = QuickTry(model=model, epochs=epochs, epochs_scale=epochs_scale, max_epochs=max_epochs)
    if resume:
        if quick.given():
            raise UsageError(f"--resume continues {run.root} as it started; leave out {', '.join(quick.given())}")
        chosen, table = _read_cv(run)
    else:
        chosen = resolve_recipe(recipe, overrides=overrides, data=data, quick=quick)
        claim_output(run, marker=run.folds, holds="cross-validation")
        check_cheap_things(chosen)
        with removed_if_unstarted(run), locked(run):
            table, facts = _start(run, chosen, folds, assignment, progress=progress)
    count = int(table["fold"].max())
    with locked(run):
        for number in range(1, count + 1):
            _run_fold(run, chosen, number, count, facts, progress=progress, cache_dir=cache_dir)
        summary, oof, class_names, report = _summarise(run, chosen, count)
    return CVResult(run.root, summary, oof, class_names, report, facts, time.perf_counter() - started)


def _read_cv(run: RunDir) -> tuple[Recipe, pd.DataFrame]:
    if not run.folds.is_file() or not run.recipe.is_file():
        raise RunDirError(
            f"cannot resume {run.root}: no folds.csv, so it is no cross-validation folder ('finetune train --folds K')"
        )
    table = read_text_table(run.folds)
    table["fold"] = table["fold"].astype(int)
    recipe = load_recipe(run.recipe)
    refuse_edited_since_start(run, recipe)  # one summary never mixes two recipes
    return recipe, table


def _start(
    run: RunDir, recipe: Recipe, folds: int, assignment: pd.DataFrame | None, *, progress: bool
) -> tuple[pd.DataFrame, dict[str, ImageFacts]]:
    """Screen once, assign the folds, write every fold's manifest; recipe.yaml last (it marks a resumable folder)."""
    samples, excluded = apply_exclude(read_samples(recipe.data), recipe.data.exclude)
    multilabel = manifest_is_multilabel(recipe.data)
    screened = screen_samples(
        samples, policy=recipe.data.bad_images, progress=progress, cache=FactsCache.default(), multilabel=multilabel
    )
    kept = screened.samples.assign(path=[path_key(p) for p in screened.samples["path"]])
    facts = {path_key(p): f for p, f in screened.facts.items()}
    if assignment is None:
        cfg = recipe.data
        table = assign_folds(
            kept,
            folds=folds,
            seed=recipe.seed,
            test_fraction=cfg.test_fraction,
            group_pattern=cfg.group_pattern,
            multilabel=multilabel,
        )
    else:
        table = assignment[assignment["path"].isin(set(kept["path"]))].reset_index(drop=True)
    run.root.mkdir(parents=True, exist_ok=True)
    write_table(screened.skipped, run.skipped)
    if len(excluded):
        write_table(excluded, run.excluded)
    count = int(table["fold"].max())
    for number in range(1, count + 1):
        run.fold_manifest(number).parent.mkdir(parents=True, exist_ok=True)
        write_table(fold_manifest(table, number, multilabel=multilabel), run.fold_manifest(number))
    write_table(table, run.folds)
    save_run_recipe(run, recipe)
    held = table[table["fold"] > 0]
    log.info(
        "%d-fold cross-validation of %d images (%d in the test split, kept out) -> %s",
        count,
        len(held),
        int((table["fold"] == 0).sum()),
        run.root,
    )
    return table, facts


def _run_fold(
    run: RunDir,
    recipe: Recipe,
    number: int,
    count: int,
    facts: Mapping[str, ImageFacts],
    *,
    progress: bool,
    cache_dir: str | Path | None,
) -> None:
    fold = run.fold(number)
    if (fold.report / "metrics.json").is_file():
        log.info("fold %d/%d: finished earlier, kept", number, count)
        return
    log.info("fold %d/%d", number, count)
    if fold.last.is_file():
        train(out=fold.root, resume=True, progress=progress, cache_dir=cache_dir)
        return
    data = recipe.data.model_copy(update={"path": run.fold_manifest(number), "exclude": None})
    train(
        recipe=recipe.model_copy(update={"data": data}), out=fold.root, progress=progress, cache_dir=cache_dir, known_images=facts
    )


def fold_predictions(fold: RunDir, record: CheckpointRecord | None = None) -> Predictions:
    """The fold model's calibrated predictions of its val split (the held-out fold), from its best.pt (`record`, when
    already read)."""
    record = record if record is not None else read_record(fold.best)
    rows = read_text_table(fold.splits)
    rows = rows[rows["split"] == "val"]
    if record.task.name == "multilabel":
        targets = multi_hot(list(rows["label"]), record.class_names)
    else:
        targets = np.array([record.class_names.index(label) for label in rows["label"]])
    if record.validation is None or len(record.validation[1]) != len(targets) or (record.validation[1] != targets).any():
        raise CheckpointError(f"{fold.best} holds predictions for other images than {fold.splits}'s val split; retrain the fold")
    logits = record.validation[0]
    return Predictions.from_logits(list(rows["path"]), logits, targets, temperature=record.temperature, task=record.task)


def _concatenate(parts: list[Predictions]) -> Predictions:
    logits = np.concatenate([p.logits for p in parts if p.logits is not None])
    return Predictions(
        paths=[path for p in parts for path in p.paths],
        probs=np.concatenate([p.probs for p in parts]),
        targets=np.concatenate([p.targets for p in parts]),
        logits=logits,
        task=parts[0].task,
    )


def _summarise(run: RunDir, recipe: Recipe, count: int) -> tuple[pd.DataFrame, Predictions, list[str], Report]:
    """cv_summary.csv/.md and the out-of-fold report."""
    records = [read_record(run.fold(k).best) for k in range(1, count + 1)]
    figures = MULTILABEL_FIGURES if records[0].task.name == "multilabel" else FOLD_FIGURES
    rows = []
    for number in range(1, count + 1):
        metrics = json.loads((run.fold(number).report / "metrics.json").read_text(encoding="utf-8"))
        split = metrics.get("evaluated_on", {}).get("split", "val")
        rows.append(
            {"fold": str(number), "evaluated_on": split, "images": metrics["num_images"], **{k: metrics[k] for k in figures}}
        )
    folds = pd.DataFrame(rows).astype({"images": int})
    spread = pd.DataFrame(
        [
            {"fold": "mean", **folds[list(figures)].mean().to_dict()},
            {"fold": "std", **folds[list(figures)].std(ddof=1).to_dict()},
        ]
    )
    summary = pd.concat([folds, spread], ignore_index=True).astype({"images": "Int64"})  # a count: 133, not 133.000
    write_table(summary, run.cv_summary, float_format="%.6f")
    oof = _concatenate([fold_predictions(run.fold(k), record) for k, record in enumerate(records, 1)])
    class_names = records[0].class_names
    note = f"{count} folds; each image predicted by the fold model that did not train on it (that model's early stopping saw it)"
    context = RunContext(
        meta=_run_meta(recipe, records),
        split="out-of-fold",
        selection=True,
        extra={"cross-validation": note},
        folds=[(run.fold(k), record.epoch) for k, record in enumerate(records, 1)],
    )
    title = f"{recipe.model.name}: {count}-fold out-of-fold predictions ({len(oof.paths)} images)"
    if oof.task.name == "multilabel":
        report = write_multilabel_report(oof, class_names, run.oof, title=title, context=context)
    else:
        report = write_report(oof, class_names, run.oof, top_k=recipe.eval.top_k, title=title, context=context)
    write_text(run.root / "cv_summary.md", _summary_markdown(summary, report, count, figures))
    return summary, oof, class_names, report


def _run_meta(recipe: Recipe, records: list[CheckpointRecord]) -> dict[str, Any]:
    """What the out-of-fold report says of the run: the cross-validation's own recipe (its data, not fold 1's manifest)
    and every fold's kept epoch, with the model, input and versions the folds share."""
    epochs = ", ".join(f"fold {k}: {record.epoch or '?'}" for k, record in enumerate(records, 1))
    return {**records[0].meta, "recipe": recipe.to_dict(), "epoch": epochs}


def _summary_markdown(summary: pd.DataFrame, report: Report, count: int, figures: Sequence[str] = FOLD_FIGURES) -> str:
    folds = summary[~summary["fold"].isin(["mean", "std"])]
    mean, std = summary.set_index("fold").loc["mean"], summary.set_index("fold").loc["std"]
    split = folds["evaluated_on"].iloc[0]
    first, words = figures[0], figures[0].replace("_", " ")
    lines = [
        f"# {count}-fold cross-validation",
        "",
        f"Per fold, on its {'held-out fold' if split == 'val' else 'test split'}: {words} {mean[first]:.3f} ± {std[first]:.3f}, "
        f"macro-F1 {mean['macro_f1']:.3f} ± {std['macro_f1']:.3f} (mean ± sample standard deviation).",
        "",
        f"Out of fold ({report.metrics['num_images']} images, each predicted once by the model that did not train on it): "
        f"{words} {report.metrics[first]:.3f}, macro-F1 {report.metrics['macro_f1']:.3f}; see oof/report.html.",
        "",
        markdown_table(folds, names=[c for c in folds.columns if folds[c].dtype == object], floatfmt=".3f"),
        "",
    ]
    return "\n".join(lines)
