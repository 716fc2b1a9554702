"""metrics.csv: one row per epoch, appended as training goes, cut back to the last checkpoint before a resume.

Columns: epoch (over all phases), phase, phase_epoch, lr (the head's, at the epoch's first step), train_loss,
train_accuracy (empty in epochs that mix images with mixup/cutmix: a blend has no single right class),
val_loss / val_accuracy / val_macro_f1 of the raw weights, with `train.ema` the same of the averaged weights
(ema_val_*) and `selected` (which of the two early stopping and best.pt followed), and the epoch's seconds.
"""

from __future__ import annotations

import math
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
    "val_mean_average_precision",  # several labels per image only
    "seconds",
]
EMA_COLUMNS = ["ema_val_loss", "ema_val_accuracy", "ema_val_macro_f1", "ema_val_mean_average_precision", "selected"]


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


def epoch_table(history: pd.DataFrame, *, kept_epoch: int | None = None) -> str:
    """The run's epochs as a fixed-width table (as fastai prints after fit): losses, accuracies, macro-F1 (and mean
    average precision with several labels per image), time; `kept` marks the epoch best.pt holds."""
    columns = [
        c
        for c in (
            "epoch",
            "phase",
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "val_macro_f1",
            "val_mean_average_precision",  # several labels per image: what picks the kept epoch by default
        )
        if c in history
    ]
    columns += [c for c in ("ema_val_accuracy", "selected") if c in history]
    table = history[columns].copy()
    if kept_epoch is not None:
        table["kept"] = ["*" if e == kept_epoch else "" for e in history["epoch"]]
    table["time"] = [clock(s) for s in history["seconds"]]
    return table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")


def clock(seconds: float) -> str:
    """mm:ss (h:mm:ss from an hour on), as fastai shows an epoch's time."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


LIVE_COLUMNS = (  # (header, metrics.csv key, width): the table the terminal grows by one row per epoch
    ("epoch", "epoch", 5),
    ("phase", "phase", 5),
    ("train_loss", "train_loss", 10),
    ("train_acc", "train_accuracy", 9),
    ("val_loss", "val_loss", 8),
    ("val_acc", "val_accuracy", 7),
    ("val_f1", "val_macro_f1", 6),
)
MEAN_AP_COLUMN = ("val_mAP", "val_mean_average_precision", 7)  # several labels per image: what picks best.pt by default


def live_header(*, ema: bool, mean_ap: bool = False) -> str:
    """The header of the epoch table printed as training goes (the time column is 'duration', mm:ss); `mean_ap` adds
    the validation mean average precision of a run with several labels per image."""
    names = [f"{name:>{width}}" for name, _, width in (*LIVE_COLUMNS, *([MEAN_AP_COLUMN] if mean_ap else []))]
    names += ["ema_acc", "kept"] if ema else []
    return "  ".join([*names, "duration", "best"])


def live_row(row: dict[str, Any], *, best: bool) -> str:
    """One epoch's line under `live_header`: '*' under best when best.pt now holds this epoch; train_acc says
    'mixed' in epochs that mix images (a blend has no single right class)."""
    cells = []
    columns = (*LIVE_COLUMNS, *([MEAN_AP_COLUMN] if MEAN_AP_COLUMN[1] in row else []))
    for _, key, width in columns:
        value = row[key]
        if key in ("epoch", "phase"):
            cells.append(f"{int(value):>{width}d}")
        elif key == MEAN_AP_COLUMN[1] and not math.isfinite(value):
            cells.append(f"{'-':>{width}}")  # no validation image with a positive label
        else:
            cells.append(f"{value:>{width}.4f}" if math.isfinite(value) else f"{'mixed':>{width}}")  # images mixed
    if "ema_val_accuracy" in row:
        cells += [f"{row['ema_val_accuracy']:>7.4f}", f"{row['selected']:>4}"]
    return "  ".join([*cells, f"{clock(row['seconds']):>8}", f"{'*' if best else '':>4}"])


def seconds_left(history: pd.DataFrame, total_epochs: int) -> float | None:
    """The run's remaining time from the epochs behind it. A phase's first epoch pays for caching and warm-up, so
    the estimate uses the last three epochs that are not a phase's first, or, while there are none, the phases'
    first epochs once there are two; after a single epoch there is no honest estimate yet (None)."""
    later = history[history["phase_epoch"] > 1] if len(history) else history
    steady = later if len(later) else history if len(history) >= 2 else None
    if steady is None:
        return None
    per_epoch = float(steady["seconds"].tail(3).mean())
    return max(0, total_epochs - int(history["epoch"].iloc[-1])) * per_epoch
