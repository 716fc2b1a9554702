"""Mixup / CutMix for training batches: timm's `Mixup`, and the loss and accuracy that go with mixed labels."""

from __future__ import annotations

import inspect

import timm
import torch
from timm.data import Mixup
from torch import nn

from finetune.config.train_schema import MixupConfig
from finetune.errors import RecipeError
from finetune.inference.task import SingleLabel, Task


class Mixer:
    """Mixes a batch with its reverse (timm's batch mode) and returns soft targets with the recipe's label smoothing.

    timm pairs image i with image n - 1 - i, so a batch must be even: an odd batch leaves its last image out of
    that step.
    """

    def __init__(self, cfg: MixupConfig, *, label_smoothing: float, num_classes: int, multi_label: bool = False) -> None:
        if multi_label and "multi_label" not in inspect.signature(Mixup).parameters:
            raise RecipeError(
                f"train.mixup with several labels per image needs timm 1.0.31 or newer (installed: {timm.__version__}); "
                "pip install -U timm, or remove train.mixup"
            )
        self.mixup = Mixup(
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            prob=cfg.prob,
            switch_prob=cfg.switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
            **({"multi_label": True} if multi_label else {}),  # multi-hot targets, smoothed to y * (1 - s) + s / 2
        )

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.size(0) % 2:
            images, targets = images[:-1], targets[:-1]
        if images.size(0) == 0:
            raise ValueError("mixup needs at least two images per batch; raise data.batch_size")
        mixed, soft = self.mixup(images, targets)
        return mixed, soft


def soft_target_criterion(weights: list[float] | None, *, task: Task | None = None) -> nn.Module:
    """The task's loss against mixed (soft) targets, with the class weights.

    The smoothing is already in the targets (timm's `mixup_target`), so the loss adds none.
    """
    return (task or SingleLabel()).criterion(weights)
