"""Which unlabelled images to trust and which to label next: pseudo-label thresholds chosen on the validation split
for a target precision, and a queue ranked by uncertainty with diversity (k-center greedy on backbone features).

A pseudo-label is the model's answer kept only above a confidence threshold. The threshold is chosen conservatively:
the lowest one at which the 95% Wilson interval's LOWER bound of the validation split's precision (on the images it
keeps) reaches the target, so that a small validation split cannot vouch for more than it saw (100 right answers in
a row vouch for 96.3%, 20 for 83.9%). Each class gets its own threshold, chosen the same way on the validation images
predicted as that class, when there are enough of them for the bound to reach the target at all; a class with enough
images whose answers never reach it gets no pseudo-labels; a class with too few takes the global threshold. The queue
takes the images the model is least sure of (the smallest margin between its two most probable classes) and, among
those, spreads out over the feature space, so that it is not many copies of one hard case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from finetune.evaluation.intervals import Z95, wilson_interval

SHORTLIST = 5  # the queue is chosen among the budget x SHORTLIST most uncertain images
ClassRule = Literal["own", "global", "none"]


def images_to_vouch(target: float) -> int:
    """How many validation answers, all right, it takes for the Wilson lower bound to reach `target`
    (the bound of n right out of n is n / (n + z^2))."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target precision {target}: the Wilson lower bound reaches only values below 1")
    return max(1, math.ceil(target * Z95 * Z95 / (1.0 - target) - 1e-9))


class _Kept:
    """What a threshold kept of the validation images: `answered` of them, `correct` right."""

    answered: int
    correct: int

    @property
    def precision(self) -> float:
        return self.correct / self.answered if self.answered else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.answered)


@dataclass(frozen=True)
class Tally(_Kept):
    """A threshold and what it kept of the validation images it was chosen on."""

    threshold: float
    answered: int
    correct: int


def lower_bound_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> Tally | None:
    """The lowest confidence threshold whose kept answers' Wilson lower bound of precision reaches `target`, or None."""
    best = None
    for tally in _tallies(confidence, correct):
        if tally.interval[0] >= target:
            best = tally  # thresholds come highest first: the last one meeting the target keeps the most
    return best


def best_lower_bound(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The highest Wilson lower bound of precision any threshold gives (0 without answers)."""
    return max((t.interval[0] for t in _tallies(confidence, correct)), default=0.0)


def _tallies(confidence: np.ndarray, correct: np.ndarray) -> list[Tally]:
    """One Tally per distinct confidence, highest first (a threshold keeps every answer tied at it)."""
    order = np.argsort(-confidence, kind="stable")
    conf, right = confidence[order], correct[order].astype(np.int64)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True] if len(conf) else np.zeros(0, dtype=bool)
    kept, hits = np.arange(1, len(conf) + 1), np.cumsum(right)
    return [Tally(float(conf[i]), int(kept[i]), int(hits[i])) for i in np.flatnonzero(last_of_tie)]


@dataclass(frozen=True)
class ClassThreshold:
    """One class's pseudo-label threshold and which rule set it: its own validation answers, the global threshold
    (too few of them to vouch alone), or none at all (enough of them, but they never reach the target)."""

    name: str
    rule: ClassRule
    threshold: float  # inf for rule 'none': no pseudo-label of this class
    predicted: int  # validation images predicted as this class
    answered: int  # of those, at or above the threshold
    correct: int

    def to_dict(self) -> dict[str, Any]:
        low, high = wilson_interval(self.correct, self.answered)
        return {
            "rule": self.rule,
            "threshold": self.threshold if math.isfinite(self.threshold) else None,
            "validation_predicted": self.predicted,
            "validation_answered": self.answered,
            "validation_precision": self.correct / self.answered if self.answered else None,
            "validation_precision_ci95": [low, high],
        }


@dataclass(frozen=True)
class PseudoLabelRule(_Kept):
    """Keep a pseudo-label when its confidence reaches its predicted class's threshold; what that gave on validation."""

    threshold: float  # the global threshold (classes with too few validation images use it)
    target_precision: float
    answered: int  # validation images kept by the per-class thresholds
    correct: int
    validation_images: int
    classes: tuple[ClassThreshold, ...] = field(default=())

    @property
    def coverage(self) -> float:
        return self.answered / self.validation_images

    def thresholds(self) -> np.ndarray:
        """Each class's threshold, by class index (inf: never pseudo-labelled)."""
        return np.array([c.threshold for c in self.classes], dtype=np.float64)

    def keep(self, probs: np.ndarray) -> np.ndarray:
        """Which rows of `probs` keep their answer as a pseudo-label."""
        return probs.max(axis=1) >= self.thresholds()[probs.argmax(axis=1)]

    def expected_wrong(self, kept: int) -> tuple[float, float]:
        """The expected number of wrong labels among `kept` pseudo-labels, and the number at the interval's low end."""
        low, _ = self.interval
        return kept * (1 - self.precision), kept * (1 - low)

    def to_dict(self) -> dict[str, Any]:
        low, high = self.interval
        return {
            "threshold_rule": "lowest threshold whose 95% Wilson lower bound of validation precision reaches the target",
            "threshold": self.threshold,
            "target_precision": self.target_precision,
            "validation_precision": self.precision,
            "validation_precision_ci95": [low, high],
            "validation_answered": self.answered,
            "validation_images": self.validation_images,
            "validation_coverage": self.coverage,
            "images_to_vouch": images_to_vouch(self.target_precision),
            "per_class": {c.name: c.to_dict() for c in self.classes},
        }


def precision_rule(
    probs: np.ndarray, targets: np.ndarray, target: float, *, class_names: list[str] | None = None
) -> PseudoLabelRule | None:
    """Per-class thresholds (see the module's docstring) whose validation answers reach precision `target` at the
    Wilson lower bound, or None when not even the global threshold does."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == targets
    overall = lower_bound_threshold(confidence, correct, target)
    if overall is None:
        return None
    names = class_names or [str(i) for i in range(probs.shape[1])]
    enough = images_to_vouch(target)
    classes = []
    for index, name in enumerate(names):
        mine = predicted == index
        own = lower_bound_threshold(confidence[mine], correct[mine], target) if mine.sum() >= enough else None
        rule: ClassRule = "own" if own is not None else ("none" if mine.sum() >= enough else "global")
        threshold = own.threshold if own is not None else (math.inf if rule == "none" else overall.threshold)
        kept = mine & (confidence >= threshold)
        classes.append(ClassThreshold(name, rule, threshold, int(mine.sum()), int(kept.sum()), int(correct[kept].sum())))
    rule_ = PseudoLabelRule(overall.threshold, target, 0, 0, len(targets), tuple(classes))
    kept = rule_.keep(probs)
    return PseudoLabelRule(overall.threshold, target, int(kept.sum()), int(correct[kept].sum()), len(targets), tuple(classes))


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
