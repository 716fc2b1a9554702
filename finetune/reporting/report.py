"""Write the evaluation report: metrics.json, per-class and confusion CSVs, predictions, figures, summary.md and report.html."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from finetune.data.decode import load_image
from finetune.data.transforms import ImageConfig, load_pipeline, preview_augmentations
from finetune.evaluation.inference import Predictions
from finetune.evaluation.metrics import (
    calibration_table,
    confusion_tables,
    headline_metrics,
    most_confused,
    per_class_table,
    predictions_table,
)
from finetune.files import read_table, read_text_table, write_table, write_text
from finetune.reporting.html import RunContext, render_html
from finetune.reporting.plots import plot_confusion_matrix, plot_image_grid, plot_reliability, plot_training_curves

log = logging.getLogger(__name__)
CALIBRATION_BINS = 15


@dataclass
class Report:
    """Where the report went and its headline numbers."""

    folder: Path
    metrics: dict[str, Any]
    per_class: pd.DataFrame


def _summary(metrics: dict[str, Any], per_class: pd.DataFrame, title: str, notes: dict[str, Any]) -> str:
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    worst = per_class.sort_values("f1").iloc[0]
    return "\n".join(
        [
            f"# {title}",
            "",
            f"{metrics['num_images']} images, {metrics['num_classes']} classes: accuracy **{metrics['accuracy']:.2%}**, "
            f"balanced accuracy {metrics['balanced_accuracy']:.2%}, macro F1 {metrics['macro_f1']:.3f}, ECE {metrics['ece']:.3f}.",
            "",
            pd.Series(headline, name="value").to_frame().to_markdown(floatfmt=".4f"),
            "",
            "## Per class (worst F1 first)",
            "",
            per_class.sort_values("f1").to_markdown(index=False, floatfmt=".3f"),
            "",
            f"Weakest class: **{worst['class']}** (F1 {worst['f1']:.3f}). "
            "See report.html, confusion_matrix.png and predictions.csv for where its images went.",
            "",
            *[f"- {key}: {value}" for key, value in notes.items()],
            "",
        ]
    )


def _augmentation_preview(ctx: RunContext, path: Path, *, images: int = 4, views: int = 5) -> Path | None:
    """Draws of the run's saved train pipeline on a few training images (one per class first)."""
    run = ctx.run
    if run is None or not run.train_transforms.exists() or not run.splits.exists():
        return None
    splits = read_text_table(run.splits)
    train = splits[splits["split"] == "train"].groupby("label").head(1).head(images)
    pipeline = load_pipeline(run.train_transforms)
    pipeline.set_random_seed(0)
    pictures = [load_image(p) for p in train["path"]]
    grid = preview_augmentations(pipeline, pictures, ImageConfig.from_dict(ctx.meta["image"]), views=views)
    captions = [f"{label} #{v + 1}" for label in train["label"] for v in range(views)]
    plot_image_grid(grid, captions, path, columns=views)
    return path


def _write_tables(
    folder: Path,
    preds: Predictions,
    class_names: list[str],
    *,
    top_k: int,
    metrics: dict[str, Any],
    per_class: pd.DataFrame,
    counts: pd.DataFrame,
    normalized: pd.DataFrame,
    calibration: pd.DataFrame,
    confused: pd.DataFrame,
) -> None:
    write_text(folder / "metrics.json", json.dumps(metrics, indent=2))
    write_table(per_class, folder / "per_class.csv")
    write_table(counts, folder / "confusion_matrix.csv", index=True)
    write_table(normalized, folder / "confusion_matrix_normalized.csv", index=True, float_format="%.6f")
    write_table(confused, folder / "most_confused.csv", float_format="%.6f")
    write_table(calibration, folder / "calibration.csv", float_format="%.6f")
    write_table(predictions_table(preds, class_names, top_k=top_k), folder / "predictions.csv", float_format="%.6f")


def _write_figures(
    folder: Path,
    *,
    title: str,
    metrics: dict[str, Any],
    counts: pd.DataFrame,
    normalized: pd.DataFrame,
    calibration: pd.DataFrame,
    context: RunContext | None,
) -> dict[str, Path | None]:
    plot_confusion_matrix(normalized, counts, folder / "confusion_matrix.png", title=title)
    plot_reliability(calibration, metrics["ece"], folder / "reliability.png")
    figures: dict[str, Path | None] = {
        "confusion": folder / "confusion_matrix.png",
        "reliability": folder / "reliability.png",
        "curves": None,
        "augmentation": None,
    }
    if context is not None and context.run is not None and context.run.metrics.exists():
        plot_training_curves(read_table(context.run.metrics), folder / "training_curves.png")
        figures["curves"] = folder / "training_curves.png"
    if context is not None:
        figures["augmentation"] = _augmentation_preview(context, folder / "augmentation_preview.png")
    return figures


def write_report(
    preds: Predictions, class_names: list[str], folder: Path, *, top_k: int, title: str, context: RunContext | None = None
) -> Report:
    """Compute metrics from `preds` and write every report file into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = headline_metrics(preds, class_names, top_k=top_k)
    per_class = per_class_table(preds, class_names)
    counts, normalized = confusion_tables(preds, class_names)
    calibration = calibration_table(preds, bins=CALIBRATION_BINS)
    confused = most_confused(counts)
    _write_tables(
        folder,
        preds,
        class_names,
        top_k=top_k,
        metrics=metrics,
        per_class=per_class,
        counts=counts,
        normalized=normalized,
        calibration=calibration,
        confused=confused,
    )
    figures = _write_figures(
        folder, title=title, metrics=metrics, counts=counts, normalized=normalized, calibration=calibration, context=context
    )
    write_text(folder / "summary.md", _summary(metrics, per_class, title, context.extra if context else {}))
    render_html(
        path=folder / "report.html",
        title=title,
        preds=preds,
        class_names=class_names,
        metrics=metrics,
        per_class=per_class,
        counts=counts,
        confused=confused,
        bins=CALIBRATION_BINS,
        figures=figures,
        ctx=context,
    )
    log.info("report written to %s (accuracy %.4f, open report.html)", folder, metrics["accuracy"])
    return Report(folder=folder, metrics=metrics, per_class=per_class)
