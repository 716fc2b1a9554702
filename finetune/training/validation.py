"""A model's outputs over a loader, and the per-epoch validation metrics.

`collect_logits` is the one forward loop of the package: validation here, and `evaluation.inference` on top of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from tqdm.auto import tqdm

from finetune.training.distributed import Ranks, gather_logits


@torch.inference_mode()
def collect_logits(
    model: nn.Module, batches: Iterable[Any], *, device: torch.device, progress: bool = True, desc: str = "predict"
) -> tuple[np.ndarray, np.ndarray]:
    """(N x C float32 logits, N targets) for every batch of (images, targets), in order; the model is put in eval mode."""
    model.eval()
    logits, targets = [], []
    for images, labels in tqdm(batches, desc=desc, disable=not progress, leave=False):
        logits.append(model(images.to(device, non_blocking=True)).float().cpu().numpy())
        targets.append(np.asarray(labels, dtype=np.int64))
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(logits), np.concatenate(targets)


@dataclass(frozen=True)
class Validation:
    """One epoch's validation: the metrics of metrics.csv, and the logits they came from (kept with best.pt)."""

    metrics: dict[str, float]
    logits: np.ndarray
    targets: np.ndarray


def validate(
    model: nn.Module, batches: Iterable[Any], *, device: torch.device, ranks: Ranks, total: int, num_classes: int, progress: bool
) -> Validation:
    """val_loss (mean cross-entropy), val_accuracy and val_macro_f1 over the whole validation split (all ranks)."""
    logits, targets = collect_logits(model, batches, device=device, progress=progress, desc="validate")
    logits, targets = gather_logits(logits, targets, ranks, total=total)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets)).item()
    predicted = logits.argmax(axis=1)
    f1 = f1_score(targets, predicted, average="macro", labels=list(range(num_classes)), zero_division=0)
    metrics = {"val_loss": float(loss), "val_accuracy": float((predicted == targets).mean()), "val_macro_f1": float(f1)}
    return Validation(metrics=metrics, logits=logits, targets=targets)
