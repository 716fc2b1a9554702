"""The loss: the task's criterion (cross-entropy for one label per image) with label smoothing and per-class weights
from the training labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

from finetune.config.schema import LossConfig
from finetune.errors import RecipeError, did_you_mean
from finetune.inference.task import SingleLabel, Task


def positive_weights(cfg: LossConfig, *, class_names: list[str], targets: np.ndarray) -> list[float] | None:
    """Several labels per image: each class's `pos_weight` (how much a positive counts against a negative) from the
    multi-hot training targets. 'balanced': negatives / positives; 'effective_number': Cui et al.'s weight of the
    positive count, scaled to mean 1; a dict: as given."""
    counts = np.asarray(targets, dtype=np.float64).sum(axis=0)
    if cfg.class_weights == "balanced":
        return [float(w) for w in (len(targets) - counts) / np.maximum(counts, 1.0)]
    weights = (1.0 - cfg.beta) / (1.0 - np.power(cfg.beta, np.maximum(counts, 1.0)))
    return [float(w) for w in weights * len(class_names) / weights.sum()]


def class_weights(
    cfg: LossConfig, *, class_names: list[str], targets: Sequence[int] | Sequence[np.ndarray]
) -> list[float] | None:
    """Per-class loss weights from the training labels: sklearn's 'balanced', Cui et al.'s effective number, or given
    (with multi-hot targets, the classes' `pos_weight`: see `positive_weights`)."""
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, dict):
        unknown = sorted(set(cfg.class_weights) - set(class_names))
        if unknown:
            raise RecipeError(
                f"loss.class_weights names unknown class(es) {unknown}{did_you_mean(unknown[0], class_names)}; classes: {class_names}"
            )
        return [float(cfg.class_weights.get(name, 1.0)) for name in class_names]
    if len(targets) and np.ndim(targets[0]) == 1:
        return positive_weights(cfg, class_names=class_names, targets=np.stack(list(targets)))
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
