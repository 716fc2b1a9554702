"""The report for several labels per image: metrics.json, per_class.csv (AP, threshold, precision, recall, F1 with
intervals), per-class 2x2 tables, the true-vs-predicted label co-occurrence, PR curves, reliability, the worst false
positives and false negatives per class, predictions.csv, summary.md and a self-contained report.html."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve

from finetune.data.decode import load_image
from finetune.evaluation.calibration import expected_calibration_error
from finetune.evaluation.multilabel import MultiLabelScorecard, score_multilabel
from finetune.files import read_table, replaced_folder, write_table, write_text
from finetune.inference.predictions import Predictions, multilabel_table
from finetune.reporting.html import RunContext
from finetune.reporting.page import Section, write_page
from finetune.reporting.plots import (
    plot_confusion_matrix,
    plot_labelled_grid,
    plot_pr_curves,
    plot_reliability,
    plot_training_curves,
)
from finetune.reporting.report import MARKER, Report
from finetune.reporting.summary import split_sentence

log = logging.getLogger(__name__)
WORST = 4  # gallery pictures per class and kind of error
HEADLINE = ("mean_average_precision", "macro_f1", "micro_f1", "subset_accuracy", "hamming_loss")


def _interval(metrics: dict, name: str) -> str:
    bounds = metrics.get("ci95", {}).get(name)
    value = metrics[name]
    return f"{value:.3f} (95% CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else f"{value:.3f}"


def _two_by_two(card: MultiLabelScorecard) -> pd.DataFrame:
    """Each class's own confusion table as columns: class, tp, fp, fn, tn."""
    return card.per_class[["class", "tp", "fp", "fn", "tn"]]


def _pr_curves(preds: Predictions, class_names: list[str], card: MultiLabelScorecard, path: Path) -> None:
    truth = np.asarray(preds.targets) > 0.5
    curves = []
    for c, name in enumerate(class_names):
        if not truth[:, c].any():
            continue
        precision, recall, _ = precision_recall_curve(truth[:, c], preds.probs[:, c])
        row = card.per_class.iloc[c]
        curves.append(
            (
                name,
                np.r_[precision, row["precision"]],
                np.r_[recall, row["recall"]],
                float(row["average_precision"]),
                float(row["threshold"]),
            )
        )
    plot_pr_curves(curves, path)


def worst_errors(preds: Predictions, class_names: list[str], *, per_class: int = WORST) -> pd.DataFrame:
    """Per class, the most confident false positives (highest probability without the label) and the most confident
    false negatives (lowest probability with it): class, kind, path, probability."""
    truth, predicted = np.asarray(preds.targets) > 0.5, preds.predicted.astype(bool)
    rows = []
    for c, name in enumerate(class_names):
        for kind, mask, order in (
            ("false positive", predicted[:, c] & ~truth[:, c], -1),
            ("false negative", ~predicted[:, c] & truth[:, c], 1),
        ):
            found = np.flatnonzero(mask)
            found = found[np.argsort(order * preds.probs[found, c], kind="stable")][:per_class]
            rows += [
                {"class": name, "kind": kind, "path": preds.paths[i], "probability": float(preds.probs[i, c])} for i in found
            ]
    return pd.DataFrame(rows, columns=["class", "kind", "path", "probability"])


def _gallery(errors: pd.DataFrame, path: Path) -> Path | None:
    """The worst errors as one picture grid: a row per class and kind of error, each picture with its probability."""
    if errors.empty:
        return None
    rows = [
        (f"{name}: {kind}", [(load_image(p), f"p({name}) {q:.2f}") for p, q in zip(group["path"], group["probability"])])
        for (name, kind), group in errors.groupby(["class", "kind"], sort=False)
    ]
    plot_labelled_grid(rows, path, columns=WORST)
    return path


def _figures(
    folder: Path, preds: Predictions, class_names: list[str], card: MultiLabelScorecard, context: RunContext | None
) -> dict[str, Path | None]:
    _pr_curves(preds, class_names, card, folder / "pr_curves.png")
    counts = np.asarray((np.asarray(preds.targets) > 0.5).sum(axis=0), dtype=float)
    normalized = card.cooccurrence.div(np.maximum(counts, 1.0), axis=0)  # rows over each true label's image count
    plot_confusion_matrix(
        normalized, card.cooccurrence, folder / "cooccurrence.png", title="true (rows) with predicted (columns)"
    )
    before = card.calibration_before
    ece_before = expected_calibration_error(before) if before is not None else None
    plot_reliability(
        card.calibration,
        card.metrics["ece"],
        folder / "reliability.png",
        before=before,
        ece_before=ece_before,
        confidence="confidence of each class decision, max(p, 1 - p)",
    )
    figures: dict[str, Path | None] = {
        "pr": folder / "pr_curves.png",
        "cooccurrence": folder / "cooccurrence.png",
        "reliability": folder / "reliability.png",
    }
    if context is not None and context.run is not None and context.run.metrics.exists():
        kept = context.meta.get("epoch")
        plot_training_curves(
            read_table(context.run.metrics), folder / "training_curves.png", kept_epoch=int(kept) if kept else None
        )
        figures["curves"] = folder / "training_curves.png"
    return figures


def _summary(card: MultiLabelScorecard, title: str, banner: str) -> str:
    m = card.metrics
    lines = [f"# {title}", "", banner, ""]
    lines += [f"- **{name.replace('_', ' ')}**: {_interval(m, name)}" for name in HEADLINE]
    lines += [
        f"- calibration: temperature {m['calibration']['temperature']:.3f}, ECE {m['ece']:.3f} over every class decision",
        "",
    ]
    shown = card.per_class[["class", "average_precision", "threshold", "precision", "recall", "f1", "support"]]
    lines += ["## Per class (thresholds chosen on the validation split)", "", shown.to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(lines)


def _write_files(
    folder: Path, preds: Predictions, class_names: list[str], card: MultiLabelScorecard, *, title: str, context: RunContext | None
) -> None:
    """Every file of the report into `folder` (the staging folder that is then swapped in)."""
    write_text(folder / "metrics.json", json.dumps(card.metrics, indent=2))
    write_table(card.per_class, folder / "per_class.csv", float_format="%.6f")
    write_table(_two_by_two(card), folder / "confusion_per_class.csv")
    write_table(card.cooccurrence, folder / "cooccurrence.csv", index=True)
    write_table(card.calibration, folder / "calibration.csv", float_format="%.6f")
    write_table(multilabel_table(preds, class_names), folder / "predictions.csv", float_format="%.6f")
    errors = worst_errors(preds, class_names)
    write_table(errors, folder / "worst_errors.csv", float_format="%.6f")
    figures = _figures(folder, preds, class_names, card, context)
    gallery = _gallery(errors, folder / "worst_errors.png")
    banner = split_sentence(context.split, context.selection, context.leaks) if context else "Computed on the images given."
    write_text(folder / "summary.md", _summary(card, title, banner))
    m = card.metrics
    headline = pd.DataFrame({"metric": [n.replace("_", " ") for n in HEADLINE], "value": [_interval(m, n) for n in HEADLINE]})
    per_class = card.per_class[
        ["class", "average_precision", "threshold", "precision", "recall", "f1", "support", "tp", "fp", "fn"]
    ].copy()
    for column in ("average_precision", "threshold", "precision", "recall", "f1"):  # 0.980, 1.000: one width, not 0.98, 1.0
        per_class[column] = [f"{v:.3f}" if pd.notna(v) else "-" for v in per_class[column]]
    sections = [
        Section("Headline", banner=banner, table=headline),
        Section(
            "Per class",
            paragraphs=["Thresholds were chosen on the validation split; intervals are in per_class.csv."],
            table=per_class,
        ),
        Section("Precision-recall curves", figure=figures["pr"]),
        Section("Labels: true (rows) with predicted (columns)", figure=figures["cooccurrence"]),
        Section("Calibration over every class decision", figure=figures["reliability"]),
        Section(
            "Worst false positives and false negatives per class", paragraphs=["Listed in worst_errors.csv."], figure=gallery
        ),
    ]
    if figures.get("curves"):
        sections.append(Section("Training curves", figure=figures["curves"]))
    write_page(
        folder / "report.html",
        title=title,
        intro=[f"{m['num_images']} images, {m['num_classes']} classes, several labels per image."],
        sections=sections,
    )


def write_multilabel_report(
    preds: Predictions,
    class_names: list[str],
    folder: Path,
    *,
    title: str,
    context: RunContext | None = None,
    skipped: pd.DataFrame | None = None,
) -> Report:
    """Compute every number from `preds` (multi-hot targets) and write every report file into `folder`, written aside
    and swapped in whole (as the one-label report); `skipped` lists the unreadable images left out."""
    card = score_multilabel(preds, class_names)
    if context is not None:
        card.metrics["evaluated_on"] = {
            "split": context.split,
            "selection_split": bool(context.selection),
            "tta": list(context.tta),
        }
        rule = context.meta.get("threshold_rule")
        if rule:
            card.metrics["thresholds"] = rule
    with replaced_folder(folder, marker=MARKER) as staging:
        if skipped is not None:
            write_table(skipped, staging / "skipped.csv")
        _write_files(staging, preds, class_names, card, title=title, context=context)
    m = card.metrics
    log.debug("multi-label report written to %s (mAP %.4f)", folder, m["mean_average_precision"])
    return Report(folder=folder, metrics=m, per_class=card.per_class)
