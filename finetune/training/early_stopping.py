"""Early stopping: the run's best epoch (for best.pt), the phase's best, and when a phase has waited long enough.

Ties on the monitored metric are common on small validation splits (153 images: accuracy moves in steps of 0.65
points), so a tie goes to the epoch that is better on the next metric, `TIEBREAK`: the lower validation loss for
accuracy and macro-F1, the higher accuracy for the loss. Patience counts epochs that do not improve the metric
itself: a tie that wins on the loss moves best.pt, not the patience.
"""

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


TIEBREAK = {
    "val_accuracy": "val_loss",
    "val_macro_f1": "val_loss",
    "val_mean_average_precision": "val_loss",
    "val_loss": "val_accuracy",
}


def lower_is_better(metric: str) -> bool:
    return metric.endswith("loss")


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
    best_second: float | None = None  # the TIEBREAK metric of the run's best epoch
    phase_best_second: float | None = None

    @classmethod
    def from_config(cls, cfg: EarlyStoppingConfig, *, task_metric: str = "val_accuracy") -> EarlyStopping:
        """Following the recipe's metric, or with `auto` the task's own (`task_metric`)."""
        return cls(metric=cfg.monitored(task_metric), patience=cfg.patience, min_delta=cfg.min_delta)

    def _improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if lower_is_better(self.metric) else value > best + self.min_delta

    def _wins_tie(self, value: float, second: float | None, best: float | None, best_second: float | None) -> bool:
        """Equal on the metric and better on the next one."""
        if best is None or value != best or second is None or best_second is None:
            return False
        return second < best_second if lower_is_better(TIEBREAK[self.metric]) else second > best_second

    def start_phase(self) -> None:
        self.phase_best, self.phase_best_second, self.bad_epochs = None, None, 0

    def update(self, metrics: dict[str, float], epoch: int) -> Verdict:
        """Record epoch `epoch`'s metrics; says whether it is a new best (ties broken on TIEBREAK) and whether the
        phase should stop."""
        value = float(metrics[self.metric])
        second = float(metrics[TIEBREAK[self.metric]]) if TIEBREAK[self.metric] in metrics else None
        best_of_run = self._improves(value, self.best) or self._wins_tie(value, second, self.best, self.best_second)
        if best_of_run:
            self.best, self.best_second, self.best_epoch = value, second, epoch
        improved = self._improves(value, self.phase_best)
        best_of_phase = improved or self._wins_tie(value, second, self.phase_best, self.phase_best_second)
        if best_of_phase:
            self.phase_best, self.phase_best_second = value, second
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        stop = self.patience is not None and self.bad_epochs >= self.patience
        return Verdict(best_of_run=best_of_run, best_of_phase=best_of_phase, stop_phase=stop)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
