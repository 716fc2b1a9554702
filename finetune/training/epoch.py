"""One epoch of training: the optimisation step and the pass over a loader (the inner loop, benchmarked bare)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finetune.bars import progress as progress_bar
from finetune.errors import TrainingError
from finetune.inference.task import SingleLabel, Task
from finetune.training.optim import Schedule


@dataclass(frozen=True)
class Step:
    """What one step returns: the logits (detached), the loss, and the targets it trained on (soft when mixed)."""

    logits: torch.Tensor
    loss: float
    targets: torch.Tensor


@dataclass
class Stepper:
    """One optimisation step's ingredients: loss, optimizer and schedule, precision, gradient clipping, and the
    optional mixing of the batch (with its soft-target loss) and weight average updated after the step."""

    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_clip: float | None = None
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    mixed_criterion: nn.Module | None = None
    ema: Any = None  # training.ema.StageEma
    channels_last: bool = False  # batches in NHWC memory layout, like the model
    task: Task = field(default_factory=SingleLabel)  # what counts as a correct answer on the training batches

    def __post_init__(self) -> None:
        # fp16 autocast needs a real gradient scaler; everything else a disabled one
        self._scaler = self.scaler or torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def step(self, net: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, epoch: int, index: int) -> Step:
        """Forward, loss check, backward (with clipping), optimizer, schedule and EMA step."""
        layout = torch.channels_last if self.channels_last and images.ndim == 4 else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=layout)
        targets = targets.to(self.device, non_blocking=True)
        criterion = self.criterion
        if self.mix is not None and self.mixed_criterion is not None:
            images, targets = self.mix(images, targets)
            criterion = self.mixed_criterion
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            logits = net(images)
            loss = criterion(logits.float(), targets)
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
        if self.ema is not None:
            self.ema.step()
        return Step(logits=logits.detach(), loss=float(loss.item()), targets=targets)


def train_one_epoch(
    net: nn.Module, batches: Iterable[Any], stepper: Stepper, *, epoch: int, progress: bool = True, desc: str = "train"
) -> tuple[float, float]:
    """One pass over `batches` of (images, targets); returns the mean loss and accuracy.

    The accuracy is NaN when batches are mixed (mixup/cutmix): a blend of two images has no single right class.
    """
    loss_sum, correct, seen = 0.0, 0, 0
    bar = progress_bar(batches, desc=desc, disable=not progress, leave=False)
    for index, (images, targets) in enumerate(bar):
        done = stepper.step(net, images, targets, epoch=epoch, index=index)
        count = done.targets.size(0)
        loss_sum += done.loss * count
        if stepper.mix is None:
            correct += stepper.task.correct(done.logits, done.targets)
        seen += count
        if progress:
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}")
    accuracy = correct / max(seen, 1) if stepper.mix is None else float("nan")
    return loss_sum / max(seen, 1), accuracy
