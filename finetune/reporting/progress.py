"""The live view of a run: progress.html (self-contained, reloads itself) and training_curves.png in the run folder,
rewritten after every epoch with the kept epoch (the one best.pt holds) marked.

Drawn from metrics.csv, the one record of the epochs, by a callback of the train command: the training loop
itself knows nothing of reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from finetune.files import atomic_write
from finetune.reporting.html import png_b64
from finetune.reporting.plots import plot_training_curves
from finetune.run_dir import RunDir
from finetune.training.early_stopping import TIEBREAK, lower_is_better
from finetune.training.history import clock, read_history, seconds_left

REFRESH_SECONDS = 10
SHOWN = {  # metrics.csv column -> the page's header
    "epoch": "epoch",
    "phase": "phase",
    "lr": "lr",
    "train_loss": "train loss",
    "train_accuracy": "train acc",
    "val_loss": "val loss",
    "val_accuracy": "val acc",
    "val_macro_f1": "val macro-F1",
    "val_mean_average_precision": "val mAP",
    "ema_val_accuracy": "EMA val acc",
    "selected": "kept weights",
    "seconds": "time",
}


@dataclass(frozen=True)
class Standing:
    """Where a run stands, as the page says it: epochs planned, the kept epoch and the metric that chose it."""

    total_epochs: int
    kept_epoch: int | None
    metric: str
    finished: bool = False


def _cell(column: str, value: object) -> str:
    if column == "seconds":
        return clock(float(value))  # type: ignore[arg-type]
    if column in ("epoch", "phase"):
        return str(int(value))  # type: ignore[call-overload]
    if isinstance(value, float):
        if not math.isfinite(value):
            return "mixed" if column == "train_accuracy" else "-"
        return f"{value:.3g}" if column == "lr" else f"{value:.4f}"
    return str(value)


def _sentences(history: pd.DataFrame, standing: Standing) -> tuple[str, str, str]:
    """(heading, time line, kept line) of the page."""
    done = int(history["epoch"].iloc[-1]) if len(history) else 0
    if standing.finished:
        stopped = f" of {standing.total_epochs} planned (early stopping)" if done < standing.total_epochs else ""
        heading = f"Finished: {done} epoch(s){stopped}"
        line = f"{clock(float(history['seconds'].sum()))} of training."
    else:
        heading = f"Training: epoch {done} of {standing.total_epochs} done" if done else "Training: the first epoch is running"
        left = seconds_left(history, standing.total_epochs)
        line = f"About {clock(left)} left (from the latest epochs)." if left is not None else "Time left: shown after epoch 2."
    kept = history[history["epoch"] == standing.kept_epoch] if standing.kept_epoch else history.iloc[0:0]
    if not len(kept):
        return heading, line, ""
    row, second = kept.iloc[-1], TIEBREAK[standing.metric]
    kept_line = (
        f"Kept: epoch {standing.kept_epoch} (best {standing.metric} {row[standing.metric]:.4f}, {second} {row[second]:.4f}; "
        f"a tie goes to the {'lower' if lower_is_better(second) else 'higher'} {second}): best.pt, what export and predict use."
    )
    return heading, line, kept_line


def write_progress(run: RunDir, standing: Standing) -> None:
    """Redraw training_curves.png and progress.html from metrics.csv (each written whole: a reader never sees half)."""
    history = read_history(run)
    curves = None
    if len(history):
        atomic_write(
            run.curves, lambda handle: plot_training_curves(history, handle, kept_epoch=standing.kept_epoch), durable=False
        )
        curves = png_b64(run.curves)
    heading, line, kept_line = _sentences(history, standing)
    columns = [c for c in SHOWN if c in history]
    rows = [
        {"kept": int(r["epoch"]) == standing.kept_epoch, "cells": [_cell(c, r[c]) for c in columns]}
        for _, r in history.iterrows()
    ]
    env = Environment(loader=PackageLoader("finetune.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    page = env.get_template("progress.html.j2").render(
        status=heading,
        run=str(run.root),
        written=time.strftime("%Y-%m-%d %H:%M:%S"),
        refresh=None if standing.finished else REFRESH_SECONDS,
        finished=standing.finished,
        progress_line=line,
        kept_line=kept_line,
        curves=curves,
        columns=[SHOWN[c] for c in columns],
        rows=rows,
    )
    text = page.encode("utf-8")
    atomic_write(run.progress, lambda handle: handle.write(text), durable=False)
