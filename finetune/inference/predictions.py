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
    the ranking columns then start at top1, the model's own first choice.
    """
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
