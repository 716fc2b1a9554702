"""The report's numbers for several labels per image, computed once: mean average precision with its bootstrap
interval, micro/macro F1, subset accuracy, Hamming loss, per-class AP / precision / recall / F1 at the chosen
thresholds (Wilson intervals for proportions, a seeded bootstrap for AP and F1), per-class 2x2 tables, the
true-vs-predicted label co-occurrence, and calibration over every class decision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, hamming_loss, precision_recall_fscore_support

from finetune.evaluation.calibration import calibration_block, calibration_table
from finetune.evaluation.intervals import SEED, wilson_interval
from finetune.inference.predictions import Predictions
from finetune.inference.task import mean_average_precision

RESAMPLES = 1000  # image-level bootstrap resamples for mAP, AP and F1 intervals


@dataclass
class MultiLabelScorecard:
    """The numbers of one multi-label report."""

    metrics: dict[str, Any]  # metrics.json
    per_class: pd.DataFrame  # class, average_precision, threshold, precision, recall, f1, support, tp/fp/fn/tn, intervals
    cooccurrence: pd.DataFrame  # true label (rows) x predicted label (columns): images with both
    calibration: pd.DataFrame  # confidence bins of every class decision (after the temperature)
    calibration_before: pd.DataFrame | None


def average_precision(truth: np.ndarray, scores: np.ndarray) -> float:
    """scikit-learn's `average_precision_score` for one class (sum over distinct thresholds of the recall step times
    the precision), in numpy so the bootstrap can call it a thousand times; NaN without a positive."""
    positives = truth.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    ranked, sorted_scores = truth[order], scores[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(ranked) - 1]  # the last index of each distinct score
    tps = np.cumsum(ranked)[ends]
    precision = tps / (ends + 1)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-class F1 of boolean N x C arrays (0 where a class has neither a positive nor a prediction)."""
    tp = (truth & predicted).sum(axis=0)
    denominator = truth.sum(axis=0) + predicted.sum(axis=0)
    return np.divide(2.0 * tp, denominator, out=np.zeros(truth.shape[1]), where=denominator > 0)


def _bootstrap(truth: np.ndarray, probs: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """2.5/97.5 percentiles over image resamples: mAP, macro-F1, and per class AP and F1."""
    rng = np.random.default_rng(SEED)
    n, classes = truth.shape
    ap = np.full((RESAMPLES, classes), np.nan)
    f1 = np.zeros((RESAMPLES, classes))
    for r in range(RESAMPLES):
        rows = rng.integers(0, n, n)
        t, p = truth[rows], probs[rows]
        ap[r] = [average_precision(t[:, c], p[:, c]) for c in range(classes)]
        f1[r] = _f1(t, predicted[rows])
    present = truth.sum(axis=0) > 0
    with np.errstate(all="ignore"):
        mean_ap = np.nanmean(ap[:, present], axis=1) if present.any() else np.full(RESAMPLES, np.nan)
    return {
        "mean_average_precision": np.nanpercentile(mean_ap, [2.5, 97.5]),
        "macro_f1": np.percentile(f1.mean(axis=1), [2.5, 97.5]),
        "average_precision": np.nanpercentile(ap, [2.5, 97.5], axis=0).T if present.any() else np.full((classes, 2), np.nan),
        "f1": np.percentile(f1, [2.5, 97.5], axis=0).T,
    }


def _per_class(
    truth: np.ndarray,
    probs: np.ndarray,
    predicted: np.ndarray,
    class_names: list[str],
    spans: dict[str, np.ndarray],
    cutoffs: np.ndarray,
) -> pd.DataFrame:
    tp = (truth & predicted).sum(axis=0)
    fp = (~truth & predicted).sum(axis=0)
    fn = (truth & ~predicted).sum(axis=0)
    tn = (~truth & ~predicted).sum(axis=0)
    p, r, f, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    table = pd.DataFrame({"class": class_names})
    table["average_precision"] = [average_precision(truth[:, c], probs[:, c]) for c in range(len(class_names))]
    table["average_precision_lo"], table["average_precision_hi"] = (
        spans["average_precision"][:, 0],
        spans["average_precision"][:, 1],
    )
    table["threshold"] = cutoffs
    table["precision"], table["recall"], table["f1"], table["support"] = p, r, f, support
    precision_ci = [wilson_interval(int(a), int(a + b)) for a, b in zip(tp, fp)]
    recall_ci = [wilson_interval(int(a), int(a + b)) for a, b in zip(tp, fn)]
    table["precision_lo"], table["precision_hi"] = [c[0] for c in precision_ci], [c[1] for c in precision_ci]
    table["recall_lo"], table["recall_hi"] = [c[0] for c in recall_ci], [c[1] for c in recall_ci]
    table["f1_lo"], table["f1_hi"] = spans["f1"][:, 0], spans["f1"][:, 1]
    table["tp"], table["fp"], table["fn"], table["tn"] = tp, fp, fn, tn
    return table


def cooccurrence(truth: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """How many images carry true label i (row) and predicted label j (column); the diagonal holds the true positives."""
    counts = truth.astype(np.int64).T @ predicted.astype(np.int64)
    return pd.DataFrame(counts, index=pd.Index(class_names, name="true"), columns=pd.Index(class_names, name="predicted"))


def score_multilabel(preds: Predictions, class_names: list[str]) -> MultiLabelScorecard:
    """Every number of a multi-label report from labelled predictions (multi-hot `targets`)."""
    truth = np.asarray(preds.targets) > 0.5
    predicted = preds.predicted.astype(bool)
    spans = _bootstrap(truth, preds.probs, predicted)
    n, classes = truth.shape
    subset = int((truth == predicted).all(axis=1).sum())
    metrics: dict[str, Any] = {
        "task": "multilabel",
        "num_images": int(n),
        "num_classes": int(classes),
        "mean_average_precision": mean_average_precision(truth, preds.probs),
        "classes_with_positives": int((truth.sum(axis=0) > 0).sum()),
        "subset_accuracy": subset / max(n, 1),
        "hamming_loss": float(hamming_loss(truth, predicted)),
    }
    for average in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
        metrics.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    metrics["samples_f1"] = float(f1_score(truth, predicted, average="samples", zero_division=0))
    metrics["ci95"] = {
        "mean_average_precision": [float(v) for v in spans["mean_average_precision"]],
        "macro_f1": [float(v) for v in spans["macro_f1"]],
        "subset_accuracy": list(wilson_interval(subset, n)),
    }
    calibration, before = calibration_block(preds)
    metrics["ece"] = calibration["after"]["ece"]
    metrics["nll"], metrics["brier"] = calibration["after"]["nll"], calibration["after"]["brier"]
    metrics["calibration"] = calibration
    cutoffs = preds.task.cutoffs(classes) if hasattr(preds.task, "cutoffs") else np.full(classes, 0.5)
    return MultiLabelScorecard(
        metrics=metrics,
        per_class=_per_class(truth, preds.probs, predicted, class_names, spans, cutoffs),
        cooccurrence=cooccurrence(truth, predicted, class_names),
        calibration=calibration_table(preds),
        calibration_before=before,
    )
