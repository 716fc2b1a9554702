"""One epoch of training: the optimisation step and the pass over a loader (the inner loop, benchmarked bare)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.errors import TrainingError
from finetune.training.optim import Schedule


@dataclass
class Stepper:
    """One optimisation step's ingredients: loss, optimizer and schedule, precision, gradient clipping."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        # fp16 autocast needs a real gradient scaler; everything else a disabled one
        self._scaler = self.scaler or torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def step(
        self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, epoch: int, index: int
    ) -> tuple[torch.Tensor, float]:
        """Forward, loss check, backward (with clipping), optimizer and schedule step; returns (logits, loss)."""
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = net(images)
            loss = self.criterion(logits.float(), targets)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch}, step {index + 1} (lr {self.optimizer.param_groups[0]['lr']:.3g}); "
                "HINT: lower train.lr or set train.grad_clip (the last good checkpoint is kept)"
            )
        scaler = self._scaler
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.grad_clip is not None:
            scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.schedule.step()
        return logits.detach(), float(loss.item())


def train_one_epoch(
    net: nn.Module, batches: Iterable[Any], stepper: Stepper, *, epoch: int, progress: bool = True, desc: str = "train"
) -> tuple[float, float]:
    """One pass over `batches` of (images, targets); returns the mean loss and accuracy."""
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
    for index, (images, targets) in enumerate(bar):
        logits, loss = stepper.step(net, images, targets, epoch=epoch, index=index)
        loss_sum += loss * targets.size(0)
        correct += int((logits.argmax(1).cpu() == targets).sum().item())
        seen += targets.size(0)
        if progress:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return loss_sum / max(seen, 1), correct / max(seen, 1)
