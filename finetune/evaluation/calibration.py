"""Calibrated confidence: temperature scaling (Guo et al. 2017) fitted on the validation split, and its measures.

A temperature T divides the logits before they become probabilities; it changes how sure the model says it is, never which
class it picks. It is fitted by minimising the negative log-likelihood on the validation images, so the test
split stays untouched, and reported with the expected calibration error, NLL and Brier score before and after.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from finetune.inference.predictions import Predictions
from finetune.inference.task import SingleLabel, Task

BINS = 15
T_RANGE = (0.05, 20.0)  # log-space search bounds: far beyond what a trained ResNet needs in either direction


def negative_log_likelihood(probs: np.ndarray, targets: np.ndarray, task: Task | None = None) -> float:
    """The task's NLL: mean -log p(true class) for one label, mean binary cross-entropy for several."""
    return (task or SingleLabel()).nll(probs, targets)


def brier_score(probs: np.ndarray, targets: np.ndarray, task: Task | None = None) -> float:
    """Mean squared distance between the probabilities and the (one- or multi-hot) truth, summed over classes."""
    return (task or SingleLabel()).brier(probs, targets)


def fit_temperature(logits: np.ndarray, targets: np.ndarray, task: Task | None = None) -> float:
    """The temperature that minimises the NLL of the task's probabilities of logits / T on these (validation) images."""
    if len(targets) == 0:
        return 1.0
    task = task or SingleLabel()

    def nll(log_t: float) -> float:
        return task.nll(task.probs(logits, float(np.exp(log_t))), targets)

    found = minimize_scalar(nll, bounds=tuple(np.log(T_RANGE)), method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(found.x))
    return best if nll(np.log(best)) < nll(0.0) else 1.0  # never worse than no scaling


def calibration_table(preds: Predictions, *, bins: int = BINS) -> pd.DataFrame:
    """Equal-width confidence bins: count, accuracy, mean confidence and their gap (for ECE and the reliability diagram).

    One decision per image for a single label; for several labels, every class decision of every image."""
    confidence, correct = preds.task.calibration_pairs(preds.probs, preds.targets)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else float("nan")
        conf = float(confidence[mask].mean()) if count else float("nan")
        rows.append(
            {
                "bin": b,
                "lower": edges[b],
                "upper": edges[b + 1],
                "count": count,
                "accuracy": acc,
                "confidence": conf,
                "gap": abs(acc - conf) if count else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(table: pd.DataFrame) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy - confidence| (Guo et al. 2017)."""
    filled = table[table["count"] > 0]
    return float((filled["count"] * filled["gap"]).sum() / max(int(table["count"].sum()), 1))


def calibration_summary(preds: Predictions) -> dict[str, float]:
    """ECE, NLL and Brier score of `preds` as they are."""
    return {
        "ece": expected_calibration_error(calibration_table(preds)),
        "nll": preds.task.nll(preds.probs, preds.targets),
        "brier": preds.task.brier(preds.probs, preds.targets),
    }


def calibration_block(preds: Predictions) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """metrics.json's calibration block (temperature, ECE/NLL/Brier after and, when one was applied, before), and
    the confidence bins before the temperature (None without one)."""
    after = calibration_summary(preds)
    if preds.logits is None or preds.temperature == 1.0:
        return {"temperature": preds.temperature, "after": after}, None
    unscaled = preds.with_temperature(1.0)
    return {"temperature": preds.temperature, "before": calibration_summary(unscaled), "after": after}, calibration_table(
        unscaled
    )
