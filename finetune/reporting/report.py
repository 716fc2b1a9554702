"""Write the evaluation report: metrics.json, per-class and confusion CSVs, predictions, figures, summary.md and report.html."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.data.decode import load_image
from finetune.data.transforms import ImageConfig, load_pipeline, preview_augmentations
from finetune.errors import DataError
from finetune.evaluation.calibration import BINS, expected_calibration_error
from finetune.evaluation.scorecard import Scorecard, score
from finetune.files import read_table, read_text_table, replaced_folder, write_table, write_text
from finetune.inference.predictions import Predictions, predictions_table
from finetune.inference.task import DEFAULT_TASK, Task, task_named
from finetune.reporting.html import Explain, RunContext, render_html
from finetune.reporting.plots import (
    plot_confusion_matrix,
    plot_fold_curves,
    plot_image_grid,
    plot_reliability,
    plot_risk_coverage,
    plot_training_curves,
)
from finetune.reporting.summary import summary_markdown

log = logging.getLogger(__name__)
CALIBRATION_BINS = BINS
MARKER = "metrics.json"  # what makes a folder a report, which a new report may replace whole


@dataclass
class Report:
    """Where the report went and its headline numbers."""

    folder: Path
    metrics: dict[str, Any]
    per_class: pd.DataFrame

    @property
    def headline(self) -> str:
        """'accuracy 0.9412', or with several labels per image 'mean average precision 0.9931'."""
        return headline(self.metrics)

    @property
    def task(self) -> Task:
        """The task the report was scored for (metrics.json's `task`; one label per image where it has none)."""
        return task_named(str(self.metrics.get("task", DEFAULT_TASK)))


def headline(metrics: dict[str, Any]) -> str:
    """The report's first number in words: accuracy, or mean average precision for several labels per image."""
    name = task_named(str(metrics.get("task", DEFAULT_TASK))).metric_family.headline
    return f"{name.replace('_', ' ')} {float(metrics[name]):.4f}"


def _augmentation_preview(ctx: RunContext, path: Path, *, images: int = 4, views: int = 5) -> Path | None:
    """Draws of the run's saved train pipeline on a few training images (one per class first)."""
    run = ctx.run
    if run is None or not run.train_transforms.exists() or not run.splits.exists():
        return None
    splits = read_text_table(run.splits)
    train = splits[splits["split"] == "train"].groupby("label").head(1).head(images)
    readable = [_readable(p) for p in train["path"]]
    train = train[[picture is not None for picture in readable]]
    pictures = [picture for picture in readable if picture is not None]
    if not pictures:  # the training images moved since: the preview is left out, the evaluation is not
        log.info("augmentation preview left out: the run's training images (splits.csv) are no longer readable")
        return None
    pipeline = load_pipeline(run.train_transforms)
    pipeline.set_random_seed(0)
    grid = preview_augmentations(pipeline, pictures, ImageConfig.from_dict(ctx.meta["image"]), views=views)
    captions = [f"{label} #{v + 1}" for label in train["label"] for v in range(views)]
    plot_image_grid(grid, captions, path, columns=views)
    return path


def _readable(path: str) -> np.ndarray | None:
    try:
        return load_image(path)
    except DataError:
        return None


def _write_tables(folder: Path, preds: Predictions, class_names: list[str], card: Scorecard, *, top_k: int) -> None:
    write_text(folder / "metrics.json", json.dumps(card.metrics, indent=2))
    write_table(card.per_class, folder / "per_class.csv", float_format="%.6f")
    write_table(card.counts, folder / "confusion_matrix.csv", index=True)
    write_table(card.normalized, folder / "confusion_matrix_normalized.csv", index=True, float_format="%.6f")
    write_table(card.confused, folder / "most_confused.csv", float_format="%.6f")
    write_table(card.calibration, folder / "calibration.csv", float_format="%.6f")
    write_table(card.risk, folder / "risk_coverage.csv", float_format="%.6f")
    write_table(predictions_table(preds, class_names, top_k=top_k), folder / "predictions.csv", float_format="%.6f")


def _write_figures(folder: Path, card: Scorecard, *, title: str, context: RunContext | None) -> dict[str, Path | None]:
    plot_confusion_matrix(card.normalized, card.counts, folder / "confusion_matrix.png", title=title)
    before = card.calibration_before
    ece_before = expected_calibration_error(before) if before is not None else None
    plot_reliability(card.calibration, card.metrics["ece"], folder / "reliability.png", before=before, ece_before=ece_before)
    plot_risk_coverage(card.risk, folder / "risk_coverage.png")
    figures: dict[str, Path | None] = {
        "confusion": folder / "confusion_matrix.png",
        "reliability": folder / "reliability.png",
        "risk": folder / "risk_coverage.png",
        "curves": None,
        "augmentation": None,
    }
    if context is not None and context.run is not None and context.run.metrics.exists():
        kept = context.meta.get("epoch")  # the epoch the evaluated checkpoint holds
        plot_training_curves(
            read_table(context.run.metrics), folder / "training_curves.png", kept_epoch=int(kept) if kept else None
        )
        figures["curves"] = folder / "training_curves.png"
    if context is not None and context.folds:
        runs = enumerate(context.folds, 1)
        curves = [(f"fold {k}", read_table(run.metrics), kept) for k, (run, kept) in runs if run.metrics.exists()]
        if curves:
            plot_fold_curves(curves, folder / "training_curves.png")
            figures["curves"] = folder / "training_curves.png"
    if context is not None:
        figures["augmentation"] = _augmentation_preview(context, folder / "augmentation_preview.png")
    return figures


def write_report(
    preds: Predictions,
    class_names: list[str],
    folder: Path,
    *,
    top_k: int,
    title: str,
    context: RunContext | None = None,
    explain: Explain | None = None,
    skipped: pd.DataFrame | None = None,
) -> Report:
    """Compute every number from `preds` (labelled) and write every report file into `folder`.

    `explain` draws Grad-CAM overlays for the galleries; `context` tells which split this is and whether it is the
    split that chose the model (then the report says its figures are optimistic); `skipped` lists the unreadable
    images left out. The report is written aside and swapped in whole: a kill or a failed write leaves the
    previous report (or none), never a mix of two evaluations.
    """
    card = score(preds, class_names, top_k=top_k)
    if context is not None:
        card.metrics["evaluated_on"] = {
            "split": context.split,
            "selection_split": bool(context.selection),
            "tta": list(context.tta),
        }
    with replaced_folder(folder, marker=MARKER) as staging:
        if skipped is not None:
            write_table(skipped, staging / "skipped.csv")
        _write_files(staging, preds, class_names, card, top_k=top_k, title=title, context=context, explain=explain)
    log.debug("report written to %s (accuracy %.4f)", folder, card.metrics["accuracy"])
    return Report(folder=folder, metrics=card.metrics, per_class=card.per_class)


def _write_files(
    folder: Path,
    preds: Predictions,
    class_names: list[str],
    card: Scorecard,
    *,
    top_k: int,
    title: str,
    context: RunContext | None,
    explain: Explain | None,
) -> None:
    _write_tables(folder, preds, class_names, card, top_k=top_k)
    figures = _write_figures(folder, card, title=title, context=context)
    write_text(
        folder / "summary.md",
        summary_markdown(
            card,
            title,
            split=context.split if context else None,
            selection=context.selection if context else False,
            notes=context.extra if context else {},
            leaks=context.leaks if context else None,
        ),
    )
    render_html(
        path=folder / "report.html",
        title=title,
        preds=preds,
        class_names=class_names,
        card=card,
        bins=CALIBRATION_BINS,
        figures=figures,
        ctx=context,
        explain=explain,
    )
