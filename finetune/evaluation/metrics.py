"""Classification metrics from predictions, computed with scikit-learn and tabulated with pandas."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from finetune.evaluation.calibration import calibration_table, expected_calibration_error
from finetune.inference.predictions import Predictions


def headline_metrics(preds: Predictions, class_names: list[str], *, top_k: int) -> dict[str, Any]:
    """accuracy, balanced accuracy, macro/weighted P/R/F1, top-k accuracy, number of images."""
    y_true, y_pred = preds.targets, preds.predicted
    labels = list(range(len(class_names)))
    result: dict[str, Any] = {
        "num_images": int(len(y_true)),
        "num_classes": len(class_names),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
    }
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        result.update({f"{average}_precision": float(p), f"{average}_recall": float(r), f"{average}_f1": float(f)})
    k = min(top_k, len(class_names))
    if 1 < k < len(class_names):  # top-1 is the accuracy; top-C is always 1
        result[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, preds.probs, k=k, labels=labels))
        result[f"per_class_top{k}_accuracy"] = per_class_topk(preds, class_names, k=k)
    result["ece"] = expected_calibration_error(calibration_table(preds))
    return result


def per_class_table(preds: Predictions, class_names: list[str]) -> pd.DataFrame:
    """precision, recall, f1, support per class (same numbers as sklearn's classification_report)."""
    p, r, f, s = precision_recall_fscore_support(
        preds.targets, preds.predicted, labels=list(range(len(class_names))), zero_division=0
    )
    return pd.DataFrame({"class": class_names, "precision": p, "recall": r, "f1": f, "support": s})


def confusion_tables(preds: Predictions, class_names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Counts and row-normalised (recall per true class) confusion matrices, labelled true x predicted."""
    counts = confusion_matrix(preds.targets, preds.predicted, labels=list(range(len(class_names))))
    index = pd.Index(class_names, name="true")
    columns = pd.Index(class_names, name="predicted")
    rows = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    return pd.DataFrame(counts, index=index, columns=columns), pd.DataFrame(normalized, index=index, columns=columns)


def most_confused(counts: pd.DataFrame, *, limit: int = 20) -> pd.DataFrame:
    """Off-diagonal cells of the confusion matrix, largest first (fastai's most_confused)."""
    support = counts.sum(axis=1)
    rows = [
        {"true": t, "predicted": p, "count": int(counts.at[t, p]), "fraction_of_true": counts.at[t, p] / support[t]}
        for t in counts.index
        for p in counts.columns
        if t != p and counts.at[t, p] > 0
    ]
    frame = pd.DataFrame(rows, columns=["true", "predicted", "count", "fraction_of_true"])
    return frame.sort_values(["count", "fraction_of_true"], ascending=False).head(limit).reset_index(drop=True)


def per_image_loss(preds: Predictions) -> np.ndarray:
    """Cross-entropy of each image's true class (the 'top losses' of fastai)."""
    p_true = preds.probs[np.arange(len(preds.targets)), preds.targets]
    return -np.log(np.clip(p_true, 1e-12, 1.0))


def per_class_topk(preds: Predictions, class_names: list[str], *, k: int) -> dict[str, float]:
    """Per class: fraction of its images whose true class is among the top-k predictions."""
    top = np.argsort(-preds.probs, axis=1)[:, :k]
    hit = (top == preds.targets[:, None]).any(axis=1)
    return {name: float(hit[preds.targets == i].mean()) for i, name in enumerate(class_names) if (preds.targets == i).any()}
