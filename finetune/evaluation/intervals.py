"""95% intervals for the report's metrics, and whether two runs differ by more than the noise.

Proportions get Wilson's score interval: accuracy, and each class's precision and recall. Balanced accuracy,
macro-F1 and each class's F1 get a stratified bootstrap: every resample keeps each class's image count, as a
new test set drawn like the real one would. Two runs evaluated on the same images are compared with a paired
bootstrap: both are scored on the same resampled images, so the noise they share cancels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 2000
SEED = 0
BLOCK = 1 << 22  # image indices drawn at once by a bootstrap (32 MiB of int64)


def wilson_interval(successes: int, trials: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion (better than the normal approximation near 0 and 1)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def stratified_confusions(
    targets: np.ndarray, predictions: Sequence[np.ndarray], classes: int, *, resamples: int = RESAMPLES, seed: int = SEED
) -> list[np.ndarray]:
    """(resamples x C x C) confusion matrices, true x predicted, for each array of `predictions`, all over the same
    stratified resamples: each resample draws, per class, as many images of that class as there are, with replacement.

    The draws come a block of resamples at a time (about BLOCK indices), so memory stays bounded whatever the test
    set's size (all 2,000 x N at once took 7 GB for 150,000 test images); the blocks continue one random stream, so
    the figures equal those of drawing everything at once."""
    rng = np.random.default_rng(seed)
    stacks = [np.zeros((resamples, classes, classes), dtype=np.int64) for _ in predictions]
    for label in np.unique(targets):
        members = np.flatnonzero(targets == label)
        step = max(1, BLOCK // len(members))
        for start in range(0, resamples, step):
            count = min(step, resamples - start)
            drawn = members[rng.integers(0, len(members), (count, len(members)))]
            offsets = np.arange(count)[:, None] * classes
            for stack, predicted in zip(stacks, predictions):
                cells = (predicted[drawn] + offsets).ravel()
                stack[start : start + count, label] = np.bincount(cells, minlength=count * classes).reshape(count, classes)
    return stacks


def confusion(targets: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """The (C x C) confusion matrix, true x predicted."""
    return np.bincount(targets * classes + predicted, minlength=classes * classes).reshape(classes, classes)


@dataclass(frozen=True)
class Scores:
    """Metrics of many confusion matrices at once (one row per resample)."""

    accuracy: np.ndarray
    balanced_accuracy: np.ndarray
    macro_f1: np.ndarray
    precision: np.ndarray  # resamples x C
    recall: np.ndarray
    f1: np.ndarray

    @classmethod
    def of(cls, confusion: np.ndarray) -> Scores:
        """sklearn's definitions (zero_division=0; macro averages over the classes present in the truth)."""
        diag = np.diagonal(confusion, axis1=1, axis2=2).astype(float)
        support = confusion.sum(axis=2)
        predicted = confusion.sum(axis=1)
        recall = np.divide(diag, support, out=np.zeros_like(diag), where=support > 0)
        precision = np.divide(diag, predicted, out=np.zeros_like(diag), where=predicted > 0)
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(diag), where=denominator > 0)
        present = support > 0
        return cls(
            accuracy=diag.sum(axis=1) / confusion.sum(axis=(1, 2)),
            balanced_accuracy=(recall * present).sum(axis=1) / present.sum(axis=1),
            macro_f1=f1.mean(axis=1),
            precision=precision,
            recall=recall,
            f1=f1,
        )


def _percentiles(values: np.ndarray) -> np.ndarray:
    return np.percentile(values, [2.5, 97.5], axis=0)


def bootstrap_intervals(
    targets: np.ndarray, predicted: np.ndarray, classes: int, *, resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, object]:
    """95% intervals: accuracy (Wilson), balanced accuracy and macro-F1 (stratified bootstrap), and per class P/R/F1."""
    scores = Scores.of(stratified_confusions(targets, [predicted], classes, resamples=resamples, seed=seed)[0])
    intervals: dict[str, object] = {"accuracy": list(wilson_interval(int((targets == predicted).sum()), len(targets)))}
    for name in ("balanced_accuracy", "macro_f1"):
        intervals[name] = [float(v) for v in _percentiles(getattr(scores, name))]
    low, high = _percentiles(scores.f1)
    intervals["per_class_f1"] = [[float(lo), float(hi)] for lo, hi in zip(low, high)]
    counts = confusion(targets, predicted, classes)
    hits = np.diag(counts)
    # precision and recall are proportions (hits among the predicted, among the true): Wilson, as for accuracy
    intervals["per_class_precision"] = [list(wilson_interval(int(h), int(n))) for h, n in zip(hits, counts.sum(axis=0))]
    intervals["per_class_recall"] = [list(wilson_interval(int(h), int(n))) for h, n in zip(hits, counts.sum(axis=1))]
    return intervals


@dataclass(frozen=True)
class Difference:
    """B minus A on one metric, over the same images: the observed value, its 95% interval, and the verdict."""

    metric: str
    observed: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval of the difference leaves out 0: larger than the noise of this test set."""
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "within noise"
        return "B better" if self.observed > 0 else "A better"


def paired_difference(
    targets: np.ndarray,
    predicted_a: np.ndarray,
    predicted_b: np.ndarray,
    classes: int,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> list[Difference]:
    """Paired bootstrap of B - A for accuracy, balanced accuracy and macro-F1 (both runs scored on the same resamples)."""
    a, b = map(Scores.of, stratified_confusions(targets, [predicted_a, predicted_b], classes, resamples=resamples, seed=seed))
    a0 = Scores.of(confusion(targets, predicted_a, classes)[None])
    b0 = Scores.of(confusion(targets, predicted_b, classes)[None])
    found = []
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        delta = getattr(b, name) - getattr(a, name)
        low, high = _percentiles(delta)
        found.append(Difference(name, float(getattr(b0, name)[0] - getattr(a0, name)[0]), float(low), float(high)))
    return found
