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

from finetune.inference import Predictions


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
    if k < len(class_names):
        result[f"top{k}_accuracy"] = float(top_k_accuracy_score(y_true, preds.probs, k=k, labels=labels))
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


def predictions_table(preds: Predictions, class_names: list[str], *, top_k: int) -> pd.DataFrame:
    """One row per image: path, [true label], predicted label, confidence, then top-k labels and probabilities."""
    k = min(top_k, len(class_names))
    order = np.argsort(-preds.probs, axis=1)[:, :k]
    names = np.asarray(class_names)
    frame = pd.DataFrame({"path": preds.paths})
    if (preds.targets >= 0).all():
        frame["true_label"] = names[preds.targets]
    frame["predicted_label"] = names[order[:, 0]]
    frame["confidence"] = np.take_along_axis(preds.probs, order[:, :1], axis=1)[:, 0]
    for rank in range(k):
        frame[f"top{rank + 1}_label"] = names[order[:, rank]]
        frame[f"top{rank + 1}_prob"] = np.take_along_axis(preds.probs, order[:, rank : rank + 1], axis=1)[:, 0]
    return frame
