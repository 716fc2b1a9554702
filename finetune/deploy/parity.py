"""Parity: the exported model against PyTorch on the same real images, prepared by finetune's own decode and resize."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from finetune.inference.task import MultiLabel, Task

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 NHWC batch -> (logits, probs)
FP32_TOLERANCE = 1e-4  # largest probability difference accepted for an fp32 export


@dataclass(frozen=True)
class Parity:
    images: int
    top1_agreement: float
    max_abs_prob_diff: float
    mean_abs_prob_diff: float
    accuracy_reference: float
    accuracy_exported: float
    macro_f1_reference: float
    macro_f1_exported: float
    agreement_of: str = "top-1 class"  # what `top1_agreement` compares: the top-1 class, or the whole label set

    @property
    def accuracy_delta(self) -> float:
        return self.accuracy_exported - self.accuracy_reference

    def to_dict(self) -> dict[str, float]:
        return {
            **asdict(self),
            "accuracy_delta": self.accuracy_delta,
            "macro_f1_delta": self.macro_f1_exported - self.macro_f1_reference,
        }

    def exact(self, tolerance: float = FP32_TOLERANCE) -> bool:
        return self.top1_agreement == 1.0 and self.max_abs_prob_diff <= tolerance


def measure(
    reference: Runner,
    exported: Runner,
    batches: Iterable[np.ndarray],
    targets: np.ndarray,
    classes: int,
    task: Task | None = None,
) -> Parity:
    """Run both on every batch; compare probabilities, top-1 choices and the metrics each gets against `targets`."""
    ref, exp = [], []
    for batch in batches:
        ref.append(reference(batch)[1])
        exp.append(exported(batch)[1])
    return compare(np.concatenate(ref), np.concatenate(exp), targets, classes, task)


def _compare_sets(a: np.ndarray, b: np.ndarray, targets: np.ndarray, task: MultiLabel) -> Parity:
    """Several labels per image: `top1_agreement` is the share of images whose whole label set (at the stored
    thresholds) is the same, accuracy the exact-set accuracy, F1 the macro F1 over classes."""
    da, db, truth = task.decide(a).astype(bool), task.decide(b).astype(bool), np.asarray(targets) > 0.5
    diff = np.abs(a - b)
    return Parity(
        images=len(a),
        top1_agreement=float((da == db).all(axis=1).mean()),
        max_abs_prob_diff=float(diff.max()),
        mean_abs_prob_diff=float(diff.mean()),
        accuracy_reference=float((da == truth).all(axis=1).mean()),
        accuracy_exported=float((db == truth).all(axis=1).mean()),
        macro_f1_reference=float(f1_score(truth, da, average="macro", zero_division=0)),
        macro_f1_exported=float(f1_score(truth, db, average="macro", zero_division=0)),
        agreement_of="label set",
    )


def compare(a: np.ndarray, b: np.ndarray, targets: np.ndarray, classes: int, task: Task | None = None) -> Parity:
    """Reference probabilities `a` against `b` for the same images."""
    if isinstance(task, MultiLabel):
        return _compare_sets(a, b, targets, task)
    diff = np.abs(a - b)
    labels = list(range(classes))

    def f1(probs: np.ndarray) -> float:
        return float(f1_score(targets, probs.argmax(1), labels=labels, average="macro", zero_division=0))

    return Parity(
        images=len(a),
        top1_agreement=float((a.argmax(1) == b.argmax(1)).mean()),
        max_abs_prob_diff=float(diff.max()),
        mean_abs_prob_diff=float(diff.mean()),
        accuracy_reference=float(accuracy_score(targets, a.argmax(1))),
        accuracy_exported=float(accuracy_score(targets, b.argmax(1))),
        macro_f1_reference=f1(a),
        macro_f1_exported=f1(b),
    )
