"""One epoch's validation: the raw weights, and with `train.ema` the averaged ones; which of them best.pt keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune.config.train_schema import EmaConfig
from finetune.training.early_stopping import TIEBREAK, lower_is_better
from finetune.training.validation import Validation

EMA_PREFIX = "ema_"


@dataclass(frozen=True)
class EpochScores:
    """The raw validation, the EMA one (or None), and which the run follows ('raw' or 'ema')."""

    raw: Validation
    ema: Validation | None
    selected: str

    @property
    def chosen(self) -> Validation:
        return self.ema if self.selected == "ema" and self.ema is not None else self.raw

    def columns(self) -> dict[str, Any]:
        """metrics.csv entries: val_* of the raw weights, ema_val_* and `selected` when EMA is on."""
        if self.ema is None:
            return dict(self.raw.metrics)
        ema = {EMA_PREFIX + k: v for k, v in self.ema.metrics.items()}
        return {**self.raw.metrics, **ema, "selected": self.selected}

    def outputs(self) -> dict[str, torch.Tensor]:
        """The chosen weights' validation logits, kept with best.pt (calibration and the val report reuse them)."""
        return {"val_logits": torch.from_numpy(self.chosen.logits), "val_targets": torch.from_numpy(self.chosen.targets)}


def _better(a: dict[str, float], b: dict[str, float], metric: str) -> bool:
    """Whether `a` validates better than `b` on `metric`, a tie going to the better TIEBREAK metric (lower loss)."""
    if a[metric] == b[metric]:
        metric = TIEBREAK[metric]
    return a[metric] < b[metric] if lower_is_better(metric) else a[metric] > b[metric]


def select(raw: Validation, ema: Validation | None, cfg: EmaConfig | None, *, metric: str) -> EpochScores:
    """Which weights the epoch stands for: the recipe's `ema.evaluate`, or with `both` the better on `metric`."""
    if ema is None or cfg is None or cfg.evaluate == "raw":
        return EpochScores(raw=raw, ema=ema, selected="raw")
    if cfg.evaluate == "both" and not _better(ema.metrics, raw.metrics, metric):
        return EpochScores(raw=raw, ema=ema, selected="raw")
    return EpochScores(raw=raw, ema=ema, selected="ema")


def chosen_weights(scores: EpochScores, ema_model: nn.Module | None) -> dict[str, torch.Tensor] | None:
    """The state dict best.pt should hold: None for the model's own weights, else the EMA's."""
    if scores.selected == "ema" and ema_model is not None:
        return ema_model.state_dict()
    return None
