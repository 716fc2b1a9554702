"""The task: what a label is and what the network's outputs mean. One object owns it, so a new task is a sibling
class (multi-label next), not an `if` in every room.

`SingleLabel` is one class per image: integer targets, cross-entropy, probabilities from a softmax of the
(temperature-divided) logits, the decision is the most probable class (or 'unknown' below a confidence threshold),
and the metric family is accuracy / macro-F1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from finetune.errors import CheckpointError, did_you_mean

UNKNOWN = "unknown"  # the label of an image the reject option leaves unanswered


@dataclass(frozen=True)
class SingleLabel:
    """One class per image."""

    name: ClassVar[str] = "single_label"
    probability_rule: ClassVar[str] = "softmax(logits / temperature): calibrated probabilities"
    early_stopping_metric: ClassVar[str] = "val_accuracy"

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


Task = SingleLabel  # the type every room names; MultiLabel joins it as a Union when it lands
TASKS: dict[str, Task] = {SingleLabel.name: SingleLabel()}
DEFAULT_TASK = SingleLabel.name


def task_named(name: str) -> Task:
    """The task object stored under `name` in a checkpoint or an exported file."""
    if name not in TASKS:
        raise CheckpointError(
            f"task '{name}' is not known to this finetune{did_you_mean(name, list(TASKS))}; known: {', '.join(TASKS)}; upgrade finetune"
        )
    return TASKS[name]
