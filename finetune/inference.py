"""Run a model over a loader: class probabilities for every image, with tqdm progress."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class Predictions:
    """Softmax probabilities (N x C) for `paths`; `targets` is -1 where the label is unknown."""

    paths: list[str]
    probs: np.ndarray
    targets: np.ndarray

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def run_inference(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    *,
    device: torch.device,
    paths: Sequence[str],
    progress: bool = True,
    desc: str = "predict",
) -> tuple[Predictions, float]:
    """Probabilities for every batch of `loader` (in order) and the mean cross-entropy where labels exist."""
    model.eval()
    probs, targets = [], []
    loss_sum, counted = 0.0, 0
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        logits = model(images.to(device, non_blocking=True)).float()
        labels = labels.to(device)
        known = labels >= 0
        if known.any():
            loss_sum += nn.functional.cross_entropy(logits[known], labels[known], reduction="sum").item()
            counted += int(known.sum())
        probs.append(logits.softmax(dim=1).cpu().numpy())
        targets.append(labels.cpu().numpy())
    result = Predictions(
        paths=list(paths),
        probs=np.concatenate(probs) if probs else np.zeros((0, 0)),
        targets=np.concatenate(targets) if targets else np.zeros(0, dtype=int),
    )
    return result, (loss_sum / counted if counted else float("nan"))
