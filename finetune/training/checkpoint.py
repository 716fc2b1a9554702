"""Writes a run's checkpoints during training (best.pt, last.pt, phase_best.pt) in the format of
`finetune.inference.checkpoint`, which also reads them."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.config.schema import Recipe
from finetune.data.transforms import ImageConfig
from finetune.files import atomic_write, guarded
from finetune.inference.checkpoint import make_payload, save_checkpoint
from finetune.inference.task import DEFAULT_TASK
from finetune.models.build import ModelBundle


@dataclass
class CheckpointSaver:
    """Writes best.pt, last.pt and phase_best.pt of one run, all in the one checkpoint format (rank 0 only)."""

    bundle: ModelBundle
    class_names: list[str]
    image: ImageConfig
    recipe: Recipe
    enabled: bool = True  # False on torchrun ranks other than 0
    task: str = DEFAULT_TASK  # the task's name, stored so eval, predict and export read the outputs right
    precision: dict[str, Any] | None = None  # the autocast the run trained in and why ({"amp": "bf16", "reason": ...})

    def save(
        self,
        path: Path,
        *,
        epoch: int,
        metrics: dict[str, float],
        training_state: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if not self.enabled:
            return
        extra: dict[str, Any] = {"epoch": epoch, "metrics": metrics, **(outputs or {})}
        if self.precision is not None:
            extra["precision"] = self.precision
        if training_state is not None:
            extra["training_state"] = training_state
        payload = make_payload(
            bundle=self.bundle,
            class_names=self.class_names,
            image=self.image,
            recipe=self.recipe,
            extra=extra,
            weights=weights,
            task=self.task,
        )
        save_checkpoint(payload, path, resume=path.parent.parent)

    def copy(self, source: Path, target: Path) -> None:
        """`target` becomes a copy of the checkpoint just written to `source` (no second serialisation)."""
        if not self.enabled:
            return
        with guarded(target, resume=target.parent.parent, atomic=True), open(source, "rb") as handle:
            atomic_write(target, lambda out: shutil.copyfileobj(handle, out))
