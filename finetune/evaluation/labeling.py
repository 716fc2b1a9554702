"""Which unlabelled images to trust and which to label next: a pseudo-label threshold chosen on the validation split
for a target precision, and a queue ranked by uncertainty with diversity (k-center greedy on backbone features).

A pseudo-label is the model's answer kept only above a confidence threshold. The threshold is the lowest one at which
the validation split's answered images reach the target precision (the reject option's rule, `threshold_for_accuracy`);
the Wilson interval of that precision says how far the validation images can vouch for it. The queue takes the
images the model is least sure of (the smallest margin between its two most probable classes) and, among those,
spreads out over the feature space, so that it is not many copies of one hard case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from finetune.evaluation.intervals import wilson_interval
from finetune.inference.reject import risk_coverage, threshold_for_accuracy

SHORTLIST = 5  # the queue is chosen among the budget x SHORTLIST most uncertain images


@dataclass(frozen=True)
class PseudoLabelRule:
    """Keep a pseudo-label when its confidence is at least `threshold`; what that gave on the validation split."""

    threshold: float
    target_precision: float
    answered: int  # validation images at or above the threshold
    correct: int
    validation_images: int

    @property
    def precision(self) -> float:
        return self.correct / self.answered

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.answered)

    @property
    def coverage(self) -> float:
        return self.answered / self.validation_images

    def expected_wrong(self, kept: int) -> tuple[float, float]:
        """The expected number of wrong labels among `kept` pseudo-labels, and the number at the interval's low end."""
        low, _ = self.interval
        return kept * (1 - self.precision), kept * (1 - low)

    def to_dict(self) -> dict[str, float | int | list[float]]:
        low, high = self.interval
        return {
            "threshold": self.threshold,
            "target_precision": self.target_precision,
            "validation_precision": self.precision,
            "validation_precision_ci95": [low, high],
            "validation_answered": self.answered,
            "validation_images": self.validation_images,
            "validation_coverage": self.coverage,
        }


def best_validation_precision(probs: np.ndarray, targets: np.ndarray) -> float:
    """The precision of the validation split's most confident answers (the highest any threshold gives)."""
    return float(risk_coverage(probs, targets)["accuracy"].max())


def precision_rule(probs: np.ndarray, targets: np.ndarray, target: float) -> PseudoLabelRule | None:
    """The lowest threshold whose answered validation images reach precision `target`, or None if none does."""
    rule = threshold_for_accuracy(probs, targets, target)
    if rule is None:
        return None
    kept = probs.max(axis=1) >= rule.threshold
    correct = int((probs.argmax(axis=1)[kept] == targets[kept]).sum())
    return PseudoLabelRule(rule.threshold, target, int(kept.sum()), correct, len(targets))


def margins(probs: np.ndarray) -> np.ndarray:
    """The gap between each image's two most probable classes (0: a toss-up; 1: certain)."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    top = np.sort(probs, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def k_center_greedy(features: np.ndarray, count: int) -> tuple[list[int], list[float]]:
    """`count` rows of `features`: the first, then each time the row farthest from all chosen so far; also the
    distance at which each was chosen (0 for the first). Identical rows are chosen only when nothing else is left."""
    chosen = [0]
    distances = [0.0]
    nearest = np.linalg.norm(features - features[0], axis=1)
    while len(chosen) < min(count, len(features)):
        nearest[chosen] = -1.0
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        distances.append(float(nearest[pick]))
        nearest = np.minimum(nearest, np.linalg.norm(features - features[pick], axis=1))
    return chosen, distances


@dataclass(frozen=True)
class QueueChoice:
    """The rows chosen for labelling, in the order to label them, and why each."""

    rows: list[int]
    distances: list[float]  # how far each was from those chosen before it (backbone feature space)
    shortlist: int  # how many of the most uncertain images the queue was chosen among


def choose_queue(probs: np.ndarray, features: np.ndarray, budget: int, *, shortlist: int = SHORTLIST) -> QueueChoice:
    """Up to `budget` rows: k-center greedy over the `budget x shortlist` most uncertain rows (smallest margin first),
    starting from the most uncertain, so that the queue covers the hard cases rather than repeating one."""
    order = np.argsort(margins(probs), kind="stable")[: max(budget * shortlist, budget)]
    if budget <= 0 or len(order) == 0:
        return QueueChoice([], [], len(order))
    picked, distances = k_center_greedy(features[order], budget)
    return QueueChoice([int(order[i]) for i in picked], distances, len(order))
