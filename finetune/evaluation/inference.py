"""Class probabilities for images: `Predictions`, computed with the one forward loop of `training.validation`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.training.validation import collect_logits


@dataclass
class Predictions:
    """Softmax probabilities (N x C) for `paths`; `targets` is -1 where the label is unknown.

    `logits` are kept when known (calibration needs them); `temperature` is the one the probabilities used.
    """

    paths: list[str]
    probs: np.ndarray
    targets: np.ndarray
    logits: np.ndarray | None = None
    temperature: float = 1.0

    @classmethod
    def from_logits(
        cls, paths: Sequence[str], logits: np.ndarray, targets: np.ndarray, *, temperature: float = 1.0
    ) -> Predictions:
        probs = softmax(logits / temperature) if logits.size else logits
        return cls(paths=list(paths), probs=probs, targets=targets, logits=logits, temperature=temperature)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def with_temperature(self, temperature: float) -> Predictions:
        """The same images with probabilities softmax(logits / temperature) (argmax unchanged)."""
        if self.logits is None:
            raise ValueError("these predictions carry no logits to rescale")
        return Predictions.from_logits(self.paths, self.logits, self.targets, temperature=temperature)

    def subset(self, index: np.ndarray) -> Predictions:
        logits = self.logits[index] if self.logits is not None else None
        return Predictions([self.paths[i] for i in index], self.probs[index], self.targets[index], logits, self.temperature)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float32 logits."""
    return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).softmax(dim=1).numpy()


def run_inference(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: torch.device,
    paths: Sequence[str],
    progress: bool = True,
    desc: str = "predict",
    temperature: float = 1.0,
) -> Predictions:
    """Probabilities (softmax of logits / temperature) for every batch of (images, targets), in order."""
    logits, targets = collect_logits(model, batches, device=device, progress=progress, desc=desc)
    return Predictions.from_logits(paths, logits, targets, temperature=temperature)
