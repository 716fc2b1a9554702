"""The reject option: answer "unknown" below a confidence threshold, trading coverage for accuracy.

The risk-coverage curve shows, for every threshold, the share of images still answered (coverage) and the
accuracy on those. A threshold for a target accuracy is chosen on the validation split and applied to new
images. It protects against the model's doubts on the classes it knows; it does not detect images of classes it
never saw, on which a network can be confidently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def risk_coverage(probs: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    """One row per distinct confidence threshold t: coverage (share with confidence >= t), how many images that
    is (`answered`) and the accuracy on those."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    kept = np.arange(1, len(confidence) + 1)
    last_of_tie = np.r_[confidence[1:] != confidence[:-1], True]  # a threshold keeps every image tied at it
    accuracy = np.cumsum(correct) / kept
    return pd.DataFrame(
        {
            "threshold": confidence[last_of_tie],
            "coverage": kept[last_of_tie] / len(confidence),
            "answered": kept[last_of_tie],
            "accuracy": accuracy[last_of_tie],
        }
    )


@dataclass(frozen=True)
class RejectRule:
    """Answer only when the top probability is at least `threshold`; what that gave on the split it was chosen on."""

    threshold: float
    target_accuracy: float | None = None
    coverage: float | None = None  # on the validation split
    accuracy: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {
            "threshold": self.threshold,
            "target_accuracy": self.target_accuracy,
            "coverage": self.coverage,
            "accuracy": self.accuracy,
        }


def threshold_for_accuracy(probs: np.ndarray, targets: np.ndarray, target: float) -> RejectRule | None:
    """The lowest threshold (the most images answered) whose kept accuracy reaches `target`, or None if none does."""
    curve = risk_coverage(probs, targets)
    meeting = curve[curve["accuracy"] >= target]
    if meeting.empty:
        return None
    best = meeting.loc[meeting["coverage"].idxmax()]
    return RejectRule(
        threshold=float(best["threshold"]),
        target_accuracy=target,
        coverage=float(best["coverage"]),
        accuracy=float(best["accuracy"]),
    )
