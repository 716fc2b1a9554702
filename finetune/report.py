"""Write the evaluation report files: metrics.json, per_class.csv, confusion matrices (CSV + PNG), predictions.csv, summary.md."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are files, never windows
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from finetune.inference import Predictions  # noqa: E402
from finetune.metrics import confusion_tables, headline_metrics, per_class_table, predictions_table  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class Report:
    """Where the report went and its headline numbers."""

    folder: Path
    metrics: dict[str, Any]
    per_class: pd.DataFrame


def plot_confusion_matrix(normalized: pd.DataFrame, counts: pd.DataFrame, path: Path, *, title: str) -> None:
    """Row-normalised colours with counts written in cells; the figure grows with the class count."""
    n = len(normalized)
    side = min(max(5.0, 0.45 * n + 3.0), 40.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=110)
    display = ConfusionMatrixDisplay(normalized.to_numpy(), display_labels=list(normalized.index))
    display.plot(ax=ax, cmap="Blues", colorbar=True, include_values=False, xticks_rotation=90 if n > 6 else 0)
    display.im_.set_clim(0.0, 1.0)
    if n <= 30:  # beyond that, numbers in cells are unreadable; colours carry the information
        for i in range(n):
            for j in range(n):
                value = normalized.iat[i, j]
                ax.text(j, i, f"{counts.iat[i, j]}\n{value:.0%}" if n <= 12 else f"{counts.iat[i, j]}",
                        ha="center", va="center", fontsize=9 if n <= 12 else 7,
                        color="white" if value > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _summary(metrics: dict[str, Any], per_class: pd.DataFrame, title: str) -> str:
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    worst = per_class.sort_values("f1").head(min(5, len(per_class)))
    return "\n".join(
        [
            f"# {title}",
            "",
            f"{metrics['num_images']} images, {metrics['num_classes']} classes: accuracy **{metrics['accuracy']:.2%}**, "
            f"balanced accuracy {metrics['balanced_accuracy']:.2%}, macro F1 {metrics['macro_f1']:.3f}.",
            "",
            pd.Series(headline, name="value").to_frame().to_markdown(floatfmt=".4f"),
            "",
            "## Per class (worst F1 first)",
            "",
            per_class.sort_values("f1").to_markdown(index=False, floatfmt=".3f"),
            "",
            f"Weakest class: **{worst.iloc[0]['class']}** (F1 {worst.iloc[0]['f1']:.3f}). "
            "See confusion_matrix.png and predictions.csv for where its images went.",
            "",
        ]
    )


def write_report(preds: Predictions, class_names: list[str], folder: Path, *, top_k: int, title: str) -> Report:
    """Compute metrics from `preds` and write every report file into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = headline_metrics(preds, class_names, top_k=top_k)
    per_class = per_class_table(preds, class_names)
    counts, normalized = confusion_tables(preds, class_names)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    per_class.to_csv(folder / "per_class.csv", index=False)
    counts.to_csv(folder / "confusion_matrix.csv")
    normalized.to_csv(folder / "confusion_matrix_normalized.csv", float_format="%.6f")
    predictions_table(preds, class_names, top_k=top_k).to_csv(folder / "predictions.csv", index=False, float_format="%.6f")
    plot_confusion_matrix(normalized, counts, folder / "confusion_matrix.png", title=title)
    (folder / "summary.md").write_text(_summary(metrics, per_class, title), encoding="utf-8")
    log.info("report written to %s (accuracy %.4f)", folder, metrics["accuracy"])
    return Report(folder=folder, metrics=metrics, per_class=per_class)
