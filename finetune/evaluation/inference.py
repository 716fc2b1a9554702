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
    """Softmax probabilities (N x C) for `paths`; `targets` is -1 where the label is unknown."""

    paths: list[str]
    probs: np.ndarray
    targets: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


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
) -> Predictions:
    """Probabilities for every batch of (images, targets) in order."""
    logits, targets = collect_logits(model, batches, device=device, progress=progress, desc=desc)
    return Predictions(paths=list(paths), probs=softmax(logits) if logits.size else logits, targets=targets)
