"""The per-epoch validation: the model's outputs over the validation split (all ranks) and the task's metrics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.inference.forward import collect_logits
from finetune.inference.task import SingleLabel, Task
from finetune.training.distributed import Ranks, gather_logits


@dataclass(frozen=True)
class Validation:
    """One epoch's validation: the metrics of metrics.csv, and the logits they came from (kept with best.pt)."""

    metrics: dict[str, float]
    logits: np.ndarray
    targets: np.ndarray


def validate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    device: torch.device,
    ranks: Ranks,
    total: int,
    num_classes: int,
    progress: bool,
    task: Task | None = None,
) -> Validation:
    """The task's validation metrics (single label: val_loss, val_accuracy, val_macro_f1) over the whole split."""
    logits, targets = collect_logits(model, batches, device=device, progress=progress, desc="validate")
    logits, targets = gather_logits(logits, targets, ranks, total=total)
    metrics = (task or SingleLabel()).validation_metrics(logits, targets, num_classes=num_classes)
    return Validation(metrics=metrics, logits=logits, targets=targets)
