"""The report's numbers for several labels per image, computed once: mean average precision with its bootstrap
interval, micro/macro F1, subset accuracy, Hamming loss, per-class AP / precision / recall / F1 at the chosen
thresholds (Wilson intervals for proportions, a seeded bootstrap for AP and F1), per-class 2x2 tables, the
true-vs-predicted label co-occurrence, and calibration over every class decision; and the paired bootstrap of two
runs' mAP and macro-F1 on the same images (what `compare` and `report diff` test)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, hamming_loss, precision_recall_fscore_support

from finetune.data.scan import split_labels
from finetune.evaluation.calibration import calibration_block, calibration_table
from finetune.evaluation.intervals import RESAMPLES as PAIRED_RESAMPLES
from finetune.evaluation.intervals import SEED, Difference, wilson_interval
from finetune.inference.predictions import Predictions
from finetune.inference.task import mean_average_precision

RESAMPLES = 1000  # image-level bootstrap resamples for mAP, AP and F1 intervals
CHUNK = 250  # resamples scored at once by the paired bootstrap (bounds its memory: CHUNK x images floats)
PROB_PREFIX = "prob_"  # a predictions table's probability column of a class: prob_NAME


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


def resampled_average_precision(truth: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`average_precision` of one class on many resamples at once, each given as how often it draws every image
    (counts: resamples x N). Exact: a drawn copy ties with itself, so a resample's distinct thresholds are the
    original ones it draws from. NaN where a resample holds no positive."""
    order = np.argsort(-scores, kind="mergesort")
    ends = np.r_[np.flatnonzero(np.diff(scores[order])), len(order) - 1]  # the last index of each distinct score
    weights = counts[:, order]
    drawn = np.cumsum(weights, axis=1)[:, ends]
    hits = np.cumsum(weights * truth[order], axis=1)[:, ends]
    positives = hits[:, -1:]
    precision = np.divide(hits, drawn, out=np.zeros(hits.shape), where=drawn > 0)
    recall = np.divide(hits, positives, out=np.zeros(hits.shape), where=positives > 0)
    ap = (np.diff(recall, axis=1, prepend=0.0) * precision).sum(axis=1)
    return np.where(positives[:, 0] > 0, ap, np.nan)


def _resampled_scores(truth: np.ndarray, probs: np.ndarray, predicted: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(resamples x 2): the mAP (over the classes with a positive in each resample) and macro-F1 of every resample."""
    ap = np.stack([resampled_average_precision(truth[:, c], probs[:, c], counts) for c in range(truth.shape[1])], axis=1)
    scored = (~np.isnan(ap)).sum(axis=1)  # the classes with a positive in each resample
    mean_ap = np.where(scored > 0, np.nansum(ap, axis=1) / np.maximum(scored, 1), np.nan)
    tp = counts @ (truth & predicted).astype(np.float64)
    both = counts @ truth.astype(np.float64) + counts @ predicted.astype(np.float64)
    f1 = np.divide(2.0 * tp, both, out=np.zeros(tp.shape), where=both > 0)
    return np.stack([mean_ap, f1.mean(axis=1)], axis=1)


def paired_multilabel_difference(
    truth: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    *,
    resamples: int = PAIRED_RESAMPLES,
    seed: int = SEED,
) -> list[Difference]:
    """Paired bootstrap of B - A for mean average precision and macro-F1 (each run at its own thresholds) on the same
    images: each resample draws image indices once (seeded) and scores both runs on them, so the noise of the test
    set they share cancels. Boolean N x C `truth` and decisions, N x C probabilities."""
    truth, predicted_a, predicted_b = (np.asarray(x, dtype=bool) for x in (truth, predicted_a, predicted_b))
    rng = np.random.default_rng(seed)
    n = len(truth)
    deltas = []
    for start in range(0, resamples, CHUNK):
        size = min(CHUNK, resamples - start)
        rows = rng.integers(0, n, (size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(rows.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        deltas.append(
            _resampled_scores(truth, probs_b, predicted_b, counts) - _resampled_scores(truth, probs_a, predicted_a, counts)
        )
    delta = np.concatenate(deltas)
    observed_map = mean_average_precision(truth, probs_b) - mean_average_precision(truth, probs_a)
    observed_f1 = float(_f1(truth, predicted_b).mean() - _f1(truth, predicted_a).mean())
    found = []
    for column, (name, observed) in enumerate((("mean_average_precision", observed_map), ("macro_f1", observed_f1))):
        kept = delta[~np.isnan(delta[:, column]), column]  # a resample without any positive has no mAP
        low, high = np.percentile(kept, [2.5, 97.5]) if len(kept) else (np.nan, np.nan)
        found.append(Difference(name, float(observed), float(low), float(high)))
    return found


def read_multilabel_table(frame: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(class names, truth, probabilities, decisions) of a predictions table with true sets (`multilabel_table`'s
    columns: path, true_labels, labels, prob_NAME)."""
    names = [str(c)[len(PROB_PREFIX) :] for c in frame.columns if str(c).startswith(PROB_PREFIX)]
    column = {name: c for c, name in enumerate(names)}

    def multi_hot(cells: pd.Series) -> np.ndarray:
        rows = np.zeros((len(cells), len(names)), dtype=bool)
        for r, cell in enumerate(cells):
            rows[r, [column[n] for n in split_labels(str(cell)) if n in column]] = True
        return rows

    probs = frame[[PROB_PREFIX + n for n in names]].to_numpy(dtype=np.float64)
    return names, multi_hot(frame["true_labels"]), probs, multi_hot(frame["labels"])


def paired_multilabel_tables(a: pd.DataFrame, b: pd.DataFrame) -> list[Difference]:
    """`paired_multilabel_difference` of two predictions tables (predictions.csv of two multi-label reports) when
    they hold the same images with the same true sets and classes; [] when they do not (no paired test)."""
    if "true_labels" not in a or "true_labels" not in b or len(a) != len(b) or set(a["path"]) != set(b["path"]):
        return []
    b = b.set_index("path").loc[a["path"]].reset_index()
    names_a, truth, probs_a, predicted_a = read_multilabel_table(a)
    names_b, truth_b, probs_b, predicted_b = read_multilabel_table(b)
    if names_a != names_b or (truth != truth_b).any():
        return []
    return paired_multilabel_difference(truth, probs_a, probs_b, predicted_a, predicted_b)
