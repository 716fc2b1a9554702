"""The task: what a label is and what the network's outputs mean. One object owns it, so a new task is a sibling
class, not an `if` in every room.

`SingleLabel` is one class per image: integer targets, cross-entropy, probabilities from a softmax of the
(temperature-divided) logits, the decision is the most probable class (or 'unknown' below a confidence threshold),
and the metric family is accuracy / macro-F1.

`MultiLabel` is any set of classes per image (the empty set too): multi-hot float targets, binary cross-entropy
on each class (`pos_weight` per class), probabilities from a sigmoid of the (temperature-divided) logits, the
decision is every class whose probability reaches its own threshold (chosen on the validation split), and the
metric family is mean average precision / F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score
from torch import nn

from finetune.errors import CheckpointError, did_you_mean

UNKNOWN = "unknown"  # the label of an image the reject option leaves unanswered


@dataclass(frozen=True)
class MetricFamily:
    """What a task's reports lead with and how runs of it are ranked: `compare`'s leaderboard and `report diff` read
    the names from here (keys of metrics.json and columns of per_class.csv), so they hold no task `if`."""

    headline: str  # the first number of a report, with its 95% interval in metrics.json's ci95
    rank_by: str  # what orders a leaderboard, and what the paired test against the leader compares
    tiebreak: str  # the second key of the order
    worst_class_by: str  # the per_class.csv column whose lowest value names the worst class
    per_class: tuple[str, ...]  # the per_class.csv columns `report diff` subtracts
    per_class_rank_by: str  # the one of them whose change lists a class as fixed or broken
    manifest_column: str  # the label column of a manifest: 'label', or 'labels' (names joined by |)


@dataclass(frozen=True)
class SingleLabel:
    """One class per image."""

    name: ClassVar[str] = "single_label"
    described: ClassVar[str] = "one label per image"
    probability_rule: ClassVar[str] = "softmax(logits / temperature): calibrated probabilities"
    early_stopping_metric: ClassVar[str] = "val_accuracy"
    metric_family: ClassVar[MetricFamily] = MetricFamily(
        headline="accuracy",
        rank_by="macro_f1",
        tiebreak="accuracy",
        worst_class_by="recall",
        per_class=("precision", "recall", "f1"),
        per_class_rank_by="f1",
        manifest_column="label",
    )

    def criterion(self, weights: list[float] | None = None, *, label_smoothing: float = 0.0) -> nn.Module:
        """Cross-entropy with optional per-class weights; soft (class-probability) targets are accepted too."""
        tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        return nn.CrossEntropyLoss(weight=tensor, label_smoothing=label_smoothing)

    def probabilities(self, logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Class probabilities of a batch of logits divided by `temperature` (the exported graph uses this too)."""
        return torch.softmax(logits / temperature, dim=1)

    def probs(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """`probabilities` for float32 numpy logits (N x C)."""
        tensor = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        return self.probabilities(tensor, temperature).numpy()

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The predicted class index of each image."""
        return probs.argmax(axis=1)

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """How sure the model is of its decision: the top probability (what the reject option thresholds)."""
        return probs.max(axis=1)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> int:
        """How many of a training batch's integer targets the logits rank first."""
        return int((logits.argmax(1) == targets).sum().item())

    def validation_metrics(self, logits: np.ndarray, targets: np.ndarray, *, num_classes: int) -> dict[str, float]:
        """val_loss (mean cross-entropy), val_accuracy and val_macro_f1 of one validation pass."""
        loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
        predicted = self.decide(logits)
        f1 = f1_score(targets, predicted, average="macro", labels=list(range(num_classes)), zero_division=0)
        return {"val_loss": float(loss), "val_accuracy": float((predicted == targets).mean()), "val_macro_f1": float(f1)}

    def nll(self, probs: np.ndarray, targets: np.ndarray) -> float:
        """Mean -log p(true class)."""
        picked = probs[np.arange(len(targets)), targets]
        return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())

    def brier(self, probs: np.ndarray, targets: np.ndarray) -> float:
        """Mean squared distance between the probability vector and the one-hot truth (sum over classes)."""
        onehot = np.eye(probs.shape[1])[targets]
        return float(((probs - onehot) ** 2).sum(axis=1).mean())

    def calibration_pairs(self, probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, correct) of each decision, for the reliability diagram and ECE: one per image."""
        return probs.max(axis=1), probs.argmax(axis=1) == targets

    def as_logits(self, probs: np.ndarray) -> np.ndarray:
        """Logits whose probabilities are `probs` (log p: softmax gives p back)."""
        return np.log(np.maximum(probs, np.finfo(np.float32).tiny))

    def with_thresholds(self, thresholds: object) -> SingleLabel:
        """Single-label decisions take no thresholds: the same task."""
        return self


class BinaryCrossEntropy(nn.Module):
    """`BCEWithLogitsLoss` with per-class `pos_weight`, label smoothing moved to binary targets (y * (1 - s) + s / 2,
    as timm's multi-label mixup does), and the mean over images and classes."""

    def __init__(self, pos_weight: torch.Tensor | None = None, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.smoothing = float(label_smoothing)
        self.loss = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        if self.smoothing:
            targets = targets * (1.0 - self.smoothing) + 0.5 * self.smoothing
        return self.loss(logits, targets)


def mean_average_precision(targets: np.ndarray, probs: np.ndarray) -> float:
    """Macro average precision (scikit-learn's) over the classes with at least one positive; NaN when none has."""
    present = np.flatnonzero(targets.sum(axis=0) > 0)
    if not len(present):
        return float("nan")
    return float(np.mean([average_precision_score(targets[:, c], probs[:, c]) for c in present]))


@dataclass(frozen=True)
class MultiLabel:
    """Any set of classes per image; `thresholds` (one per class, chosen on validation) turn probabilities into sets."""

    name: ClassVar[str] = "multilabel"
    described: ClassVar[str] = "several labels per image"
    probability_rule: ClassVar[str] = "sigmoid(logits / temperature): one calibrated probability per class"
    early_stopping_metric: ClassVar[str] = "val_mean_average_precision"
    metric_family: ClassVar[MetricFamily] = MetricFamily(
        headline="mean_average_precision",
        rank_by="mean_average_precision",
        tiebreak="macro_f1",
        worst_class_by="average_precision",
        per_class=("average_precision", "threshold", "precision", "recall", "f1"),
        per_class_rank_by="average_precision",
        manifest_column="labels",
    )
    thresholds: tuple[float, ...] | None = None

    def with_thresholds(self, thresholds: object) -> MultiLabel:
        """The task deciding with these per-class thresholds (None: 0.5 for every class)."""
        if thresholds is None:
            return MultiLabel()
        return MultiLabel(thresholds=tuple(float(t) for t in thresholds))  # type: ignore[attr-defined]

    def as_logits(self, probs: np.ndarray) -> np.ndarray:
        """Logits whose probabilities are `probs` (log(p / (1 - p)): the sigmoid gives p back)."""
        p = np.clip(probs, np.finfo(np.float32).tiny, 1.0 - np.finfo(np.float32).eps)
        return np.log(p / (1.0 - p))

    def cutoffs(self, num_classes: int) -> np.ndarray:
        """Each class's decision threshold on its probability."""
        if self.thresholds is None:
            return np.full(num_classes, 0.5)
        if len(self.thresholds) != num_classes:
            raise CheckpointError(
                f"{len(self.thresholds)} decision thresholds stored for {num_classes} classes; export or train again"
            )
        return np.asarray(self.thresholds, dtype=np.float64)

    def criterion(self, weights: list[float] | None = None, *, label_smoothing: float = 0.0) -> nn.Module:
        """Binary cross-entropy per class; `weights` are the classes' `pos_weight` (the weight of a positive)."""
        tensor = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
        return BinaryCrossEntropy(tensor, label_smoothing=label_smoothing)

    def probabilities(self, logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """One independent probability per class (the exported graph uses this too)."""
        return torch.sigmoid(logits / temperature)

    def probs(self, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """`probabilities` for float32 numpy logits (N x C)."""
        tensor = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        return self.probabilities(tensor, temperature).numpy()

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """N x C of 0/1: each class whose probability reaches its threshold."""
        return (probs >= self.cutoffs(probs.shape[1])).astype(np.int64)

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """How sure the model is of an image's whole set: its least sure class decision, max(p, 1 - p)."""
        return np.maximum(probs, 1.0 - probs).min(axis=1) if probs.size else np.zeros(len(probs))

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> int:
        """How many images of a training batch get exactly their label set (at probability 0.5)."""
        return int(((logits > 0) == (targets > 0.5)).all(dim=1).sum().item())

    def validation_metrics(self, logits: np.ndarray, targets: np.ndarray, *, num_classes: int) -> dict[str, float]:
        """val_loss (mean binary cross-entropy), val_accuracy (exact sets at 0.5), val_macro_f1, and
        val_mean_average_precision (threshold-free: what early stopping follows by default)."""
        tensor = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        truth = np.asarray(targets, dtype=np.float32)
        loss = nn.functional.binary_cross_entropy_with_logits(tensor, torch.from_numpy(truth)).item()
        probs = torch.sigmoid(tensor).numpy()
        predicted, positive = probs >= 0.5, truth > 0.5
        f1 = f1_score(positive, predicted, average="macro", zero_division=0)
        return {
            "val_loss": float(loss),
            "val_accuracy": float((predicted == positive).all(axis=1).mean()),
            "val_macro_f1": float(f1),
            "val_mean_average_precision": mean_average_precision(positive, probs),
        }

    def nll(self, probs: np.ndarray, targets: np.ndarray) -> float:
        """Mean binary cross-entropy over images and classes."""
        p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0 - 1e-12)
        return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())

    def brier(self, probs: np.ndarray, targets: np.ndarray) -> float:
        """Mean squared distance between the probabilities and the multi-hot truth (sum over classes)."""
        return float(((probs - targets) ** 2).sum(axis=1).mean())

    def calibration_pairs(self, probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, correct) of every class decision at 0.5 (images x classes of them), for ECE."""
        flat, truth = probs.ravel(), np.asarray(targets).ravel() > 0.5
        return np.maximum(flat, 1.0 - flat), (flat >= 0.5) == truth


Task = SingleLabel | MultiLabel  # the type every room names
TASKS: dict[str, Task] = {SingleLabel.name: SingleLabel(), MultiLabel.name: MultiLabel()}
DEFAULT_TASK = SingleLabel.name


def task_named(name: str, *, thresholds: object = None) -> Task:
    """The task object stored under `name` in a checkpoint or an exported file (with its decision thresholds)."""
    if name not in TASKS:
        raise CheckpointError(
            f"task '{name}' is not known to this finetune{did_you_mean(name, list(TASKS))}; known: {', '.join(TASKS)}; upgrade finetune"
        )
    return TASKS[name].with_thresholds(thresholds)
