"""Everything the report says about a set of predictions, computed once: metrics with their 95% intervals,
per-class table, confusion matrices, calibration before and after the temperature, and the risk-coverage curve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from finetune.evaluation.calibration import calibration_block, calibration_table
from finetune.evaluation.intervals import bootstrap_intervals
from finetune.evaluation.metrics import confusion_tables, headline_metrics, most_confused, per_class_table
from finetune.inference.predictions import Predictions
from finetune.inference.reject import risk_coverage, threshold_for_accuracy

COVERAGE_TARGETS = (0.9, 0.95, 0.99)  # accuracy levels whose coverage the report quotes


@dataclass
class Scorecard:
    """The numbers of one report."""

    metrics: dict[str, Any]  # metrics.json
    per_class: pd.DataFrame  # with 95% interval columns
    counts: pd.DataFrame
    normalized: pd.DataFrame
    confused: pd.DataFrame
    calibration: pd.DataFrame  # confidence bins of the probabilities as reported (after the temperature)
    calibration_before: pd.DataFrame | None  # the same bins without the temperature (None when there is none)
    risk: pd.DataFrame  # threshold, coverage, answered, accuracy


def _with_intervals(per_class: pd.DataFrame, intervals: dict[str, Any]) -> pd.DataFrame:
    table = per_class.copy()
    for name in ("precision", "recall", "f1"):
        bounds = np.asarray(intervals[f"per_class_{name}"])
        table[f"{name}_lo"], table[f"{name}_hi"] = bounds[:, 0], bounds[:, 1]
    return table


def _coverage(risk: pd.DataFrame, preds: Predictions) -> dict[str, float | None]:
    found: dict[str, float | None] = {}
    for target in COVERAGE_TARGETS:
        rule = threshold_for_accuracy(preds.probs, preds.targets, target)
        found[f"{target:g}"] = rule.coverage if rule is not None else None
    return found


def score(preds: Predictions, class_names: list[str], *, top_k: int) -> Scorecard:
    """Compute every number of the report from labelled predictions."""
    metrics = headline_metrics(preds, class_names, top_k=top_k)
    intervals = bootstrap_intervals(preds.targets, preds.predicted, len(class_names))
    metrics["ci95"] = {name: intervals[name] for name in ("accuracy", "balanced_accuracy", "macro_f1")}
    calibration, before = calibration_block(preds)
    metrics["nll"], metrics["brier"] = calibration["after"]["nll"], calibration["after"]["brier"]
    metrics["calibration"] = calibration
    risk = risk_coverage(preds.probs, preds.targets)
    metrics["coverage_at_accuracy"] = _coverage(risk, preds)
    counts, normalized = confusion_tables(preds, class_names)
    return Scorecard(
        metrics=metrics,
        per_class=_with_intervals(per_class_table(preds, class_names), intervals),
        counts=counts,
        normalized=normalized,
        confused=most_confused(counts),
        calibration=calibration_table(preds),
        calibration_before=before,
        risk=risk,
    )
