"""Early stopping: the run's best epoch (for best.pt), the phase's best, and when a phase has waited long enough."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from finetune.config.schema import EarlyStoppingConfig


@dataclass(frozen=True)
class Verdict:
    """What one epoch's monitored value means."""

    best_of_run: bool  # write best.pt
    best_of_phase: bool  # remember for restore_best
    stop_phase: bool  # patience is used up


@dataclass
class EarlyStopping:
    """Tracks the monitored metric over a run; its fields are checkpointed so a resumed run decides the same."""

    metric: str = "val_accuracy"
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    phase_best: float | None = None
    bad_epochs: int = 0

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig) -> EarlyStopping:
        return cls(metric=cfg.metric, patience=cfg.patience, min_delta=cfg.min_delta)

    def _improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.metric == "val_loss" else value > best + self.min_delta

    def start_phase(self) -> None:
        self.phase_best, self.bad_epochs = None, 0

    def update(self, metrics: dict[str, float], epoch: int) -> Verdict:
        """Record epoch `epoch`'s metrics; says whether it is a new best and whether the phase should stop."""
        value = float(metrics[self.metric])
        best_of_run = self._improves(value, self.best)
        if best_of_run:
            self.best, self.best_epoch = value, epoch
        best_of_phase = self._improves(value, self.phase_best)
        if best_of_phase:
            self.phase_best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        stop = self.patience is not None and self.bad_epochs >= self.patience
        return Verdict(best_of_run=best_of_run, best_of_phase=best_of_phase, stop_phase=stop)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
