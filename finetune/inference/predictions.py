"""`Predictions`: what a model said about a list of images, and the table `finetune predict` writes of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from finetune.inference.task import UNKNOWN, SingleLabel, Task


@dataclass
class Predictions:
    """Calibrated probabilities (N x C) for `paths`; `targets` is -1 where the label is unknown.

    `logits` are kept when known (calibration needs them); `temperature` is the one the probabilities used; `task`
    says what the probabilities mean and how a decision is taken from them.
    """

    paths: list[str]
    probs: np.ndarray
    targets: np.ndarray
    logits: np.ndarray | None = None
    temperature: float = 1.0
    task: Task = field(default_factory=SingleLabel)

    @classmethod
    def from_logits(
        cls, paths: Sequence[str], logits: np.ndarray, targets: np.ndarray, *, temperature: float = 1.0, task: Task | None = None
    ) -> Predictions:
        task = task or SingleLabel()
        probs = task.probs(logits, temperature) if logits.size else logits
        return cls(paths=list(paths), probs=probs, targets=targets, logits=logits, temperature=temperature, task=task)

    @property
    def predicted(self) -> np.ndarray:
        return self.task.decide(self.probs)

    @property
    def confidence(self) -> np.ndarray:
        return self.task.confidence(self.probs)

    def with_temperature(self, temperature: float) -> Predictions:
        """The same images with probabilities recomputed at `temperature` (decisions unchanged)."""
        if self.logits is None:
            raise ValueError("these predictions carry no logits to rescale")
        return Predictions.from_logits(self.paths, self.logits, self.targets, temperature=temperature, task=self.task)

    def subset(self, index: np.ndarray) -> Predictions:
        logits = self.logits[index] if self.logits is not None else None
        paths = [self.paths[i] for i in index]
        return Predictions(paths, self.probs[index], self.targets[index], logits, self.temperature, self.task)


def predictions_table(
    preds: Predictions, class_names: list[str], *, top_k: int, min_confidence: float | None = None
) -> pd.DataFrame:
    """One row per image: path, [true label], predicted label, confidence, then the runner-up labels and probabilities.

    With `min_confidence`, images whose confidence is below it are predicted 'unknown' (the reject option);
    the ranking columns then start at top1, the model's own first choice. With several labels per image, see
    `multilabel_table`.
    """
    if preds.task.name == "multilabel":
        return multilabel_table(preds, class_names, min_confidence=min_confidence)
    k = min(top_k, len(class_names))
    order = np.argsort(-preds.probs, axis=1)[:, :k]
    names = np.asarray(class_names, dtype=object)
    frame = pd.DataFrame({"path": preds.paths})
    if (preds.targets >= 0).all():
        frame["true_label"] = names[preds.targets]
    confidence = preds.confidence
    frame["predicted_label"] = names[preds.predicted]
    frame["confidence"] = confidence
    first = 2
    if min_confidence is not None:
        frame.loc[confidence < min_confidence, "predicted_label"] = UNKNOWN
        first = 1
    for rank in range(first - 1, k):
        frame[f"top{rank + 1}_label"] = names[order[:, rank]]
        frame[f"top{rank + 1}_prob"] = np.take_along_axis(preds.probs, order[:, rank : rank + 1], axis=1)[:, 0]
    return frame


def label_sets(decisions: np.ndarray, class_names: list[str]) -> list[str]:
    """Each row of 0/1 decisions (N x C) as its class names joined by | ('' for none)."""
    return ["|".join(name for name, on in zip(class_names, row) if on) for row in decisions]


def multilabel_table(preds: Predictions, class_names: list[str], *, min_confidence: float | None = None) -> pd.DataFrame:
    """Several labels per image: path, [true_labels], labels (the predicted set, names joined by |), confidence (the
    least sure class decision, max(p, 1 - p)), then one probability column per class (`prob_NAME`).

    With `min_confidence`, an image whose least sure decision is below it gets labels 'unknown' and `unsure` names
    the classes it could not decide; `model_labels` keeps the model's own set."""
    frame = pd.DataFrame({"path": preds.paths})
    targets = np.asarray(preds.targets)
    if targets.ndim == 2:
        frame["true_labels"] = label_sets(targets > 0.5, class_names)
    decided = label_sets(preds.predicted, class_names)
    frame["labels"] = decided
    frame["confidence"] = preds.confidence
    if min_confidence is not None:
        sure = np.maximum(preds.probs, 1.0 - preds.probs) >= min_confidence
        frame["model_labels"] = decided
        frame["unsure"] = ["|".join(n for n, ok in zip(class_names, row) if not ok) for row in sure]
        frame.loc[frame["confidence"] < min_confidence, "labels"] = UNKNOWN
    for c, name in enumerate(class_names):
        frame[f"prob_{name}"] = preds.probs[:, c] if len(preds.probs) else []
    return frame
