"""The loss: the task's criterion (cross-entropy for one label per image) with label smoothing and per-class weights
from the training labels."""

from __future__ import annotations

import numpy as np
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from finetune.config.schema import LossConfig
from finetune.errors import RecipeError, did_you_mean
from finetune.inference.task import SingleLabel, Task


def class_weights(cfg: LossConfig, *, class_names: list[str], targets: list[int]) -> list[float] | None:
    """Per-class loss weights from the training labels: sklearn's 'balanced', Cui et al.'s effective number, or given."""
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, dict):
        unknown = sorted(set(cfg.class_weights) - set(class_names))
        if unknown:
            raise RecipeError(
                f"loss.class_weights names unknown class(es) {unknown}{did_you_mean(unknown[0], class_names)}; classes: {class_names}"
            )
        return [float(cfg.class_weights.get(name, 1.0)) for name in class_names]
    if cfg.class_weights == "balanced":
        weights = compute_class_weight("balanced", classes=np.arange(len(class_names)), y=np.asarray(targets))
    else:
        counts = np.bincount(np.asarray(targets), minlength=len(class_names)).astype(float)
        weights = (1.0 - cfg.beta) / (1.0 - np.power(cfg.beta, counts))
        weights = weights * len(class_names) / weights.sum()
    return [float(w) for w in weights]


def build_criterion(cfg: LossConfig, weights: list[float] | None = None, *, task: Task | None = None) -> nn.Module:
    """The task's loss with the recipe's label smoothing and optional class weights."""
    return (task or SingleLabel()).criterion(weights, label_smoothing=cfg.label_smoothing)
