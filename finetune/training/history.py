"""metrics.csv: one row per epoch, appended as training goes, cut back to the last checkpoint before a resume.

Columns: epoch (over all phases), phase, phase_epoch, lr (the head's, at the epoch's first step), train_loss,
train_accuracy (empty in epochs that mix images with mixup/cutmix: a blend has no single right class),
val_loss / val_accuracy / val_macro_f1 of the raw weights, with `train.ema` the same of the averaged weights
(ema_val_*) and `selected` (which of the two early stopping and best.pt followed), and the epoch's seconds.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from finetune.files import disk_error, read_table, write_table
from finetune.run_dir import RunDir

METRICS_COLUMNS = [
    "epoch",
    "phase",
    "phase_epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "seconds",
]
EMA_COLUMNS = ["ema_val_loss", "ema_val_accuracy", "ema_val_macro_f1", "selected"]


def append_history_row(run: RunDir, row: dict[str, Any]) -> None:
    """One epoch's row of metrics.csv (METRICS_COLUMNS, and with `train.ema` the EMA_COLUMNS before `seconds`)."""
    columns = [c for c in METRICS_COLUMNS[:-1] + EMA_COLUMNS + METRICS_COLUMNS[-1:] if c in row]
    try:
        write_table(pd.DataFrame([row], columns=columns), run.metrics, float_format="%.6g", append=True)
    except OSError as exc:
        raise disk_error(run.metrics, exc, resume=run.root) from None


def read_history(run: RunDir) -> pd.DataFrame:
    """metrics.csv as a DataFrame (empty, with the columns, before the first epoch)."""
    if not run.metrics.exists():
        return pd.DataFrame(columns=METRICS_COLUMNS)
    return read_table(run.metrics)


def truncate_history(run: RunDir, *, after_epoch: int) -> None:
    """Drop metrics.csv rows written after the last checkpoint (a kill between the row and last.pt), before a resume."""
    history = read_history(run)
    if len(history) and (history["epoch"] > after_epoch).any():
        write_table(history[history["epoch"] <= after_epoch], run.metrics, float_format="%.6g")


def epoch_table(history: pd.DataFrame) -> str:
    """The run's epochs as a fixed-width table (as fastai prints after fit): losses, accuracies, macro-F1, time."""
    columns = [
        c for c in ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1") if c in history
    ]
    columns += [c for c in ("ema_val_accuracy", "selected") if c in history]
    table = history[columns].copy()
    table["time"] = [f"{int(s) // 60:02d}:{int(s) % 60:02d}" for s in history["seconds"]]
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")
