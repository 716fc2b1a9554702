"""Per-class decision thresholds for several labels per image, chosen on the validation split.

A class is predicted when its calibrated probability reaches its threshold. The rule `f1` takes, for each class, the
threshold that maximises F1 on the validation images; `precision` the lowest threshold whose precision there
reaches the target (the most recall at that precision). The test split is never looked at.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve

log = logging.getLogger(__name__)

FALLBACK = 0.5  # a class with no positive validation image keeps the plain 0.5


def _between(cut: float, probs: np.ndarray) -> float:
    """Halfway from `cut` down to the next lower probability seen: the same decisions on these images, with a margin
    on both sides for new ones (a cut at the lowest positive's probability would miss every positive just below)."""
    lower = probs[probs < cut]
    return float((cut + lower.max()) / 2) if len(lower) else float(cut)


def _class_threshold(truth: np.ndarray, probs: np.ndarray, *, rule: str, target: float) -> tuple[float, bool]:
    """(threshold, reached): one class's threshold, and whether the rule's aim was met on these images."""
    cut, reached = _curve_threshold(truth, probs, rule=rule, target=target)
    return (_between(cut, probs) if cut != FALLBACK or reached else cut), reached


def _curve_threshold(truth: np.ndarray, probs: np.ndarray, *, rule: str, target: float) -> tuple[float, bool]:
    if truth.sum() == 0 or truth.sum() == len(truth):
        return FALLBACK, False
    precision, recall, cuts = precision_recall_curve(truth, probs)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    if rule == "precision":
        meets = np.flatnonzero(precision >= target)
        if len(meets):
            best = meets[np.argmax(recall[meets])]
            return float(cuts[best]), True
        return float(cuts[np.argmax(precision)]), False
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return float(cuts[np.argmax(f1)]), True


def choose_thresholds(
    probs: np.ndarray, targets: np.ndarray, class_names: list[str], *, rule: str = "f1", target: float = 0.9
) -> pd.DataFrame:
    """One row per class: class, threshold, and the validation precision / recall / F1 it gives, `reached` (False:
    no positive on validation, 0.5 kept; or the precision target out of reach, the most precise threshold kept)."""
    rows = []
    truth = np.asarray(targets) > 0.5
    for c, name in enumerate(class_names):
        cut, reached = _class_threshold(truth[:, c], probs[:, c], rule=rule, target=target)
        predicted = probs[:, c] >= cut
        tp = int((predicted & truth[:, c]).sum())
        precision = tp / max(int(predicted.sum()), 1)
        recall = tp / max(int(truth[:, c].sum()), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {"class": name, "threshold": cut, "val_precision": precision, "val_recall": recall, "val_f1": f1, "reached": reached}
        )
    table = pd.DataFrame(rows)
    missed = table.loc[~table["reached"], "class"].tolist()
    if missed:
        aim = f"precision {target:g}" if rule == "precision" else "a positive validation image"
        log.warning(
            "%d class(es) did not reach %s on the validation split (%s); their threshold is a fallback",
            len(missed),
            aim,
            ", ".join(missed[:5]),
        )
    return table
