"""Every figure of the reports, drawn on `matplotlib.figure.Figure` objects (no pyplot, no backend switch) and saved as PNG."""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay

MIN_ANSWERED = 10  # the accuracy-vs-coverage curve starts where this many images are answered
CELL_TEXT_LIMIT = 30  # beyond this many classes numbers in cells are unreadable; colours carry the information
PERCENT_LIMIT = 12  # up to this many classes a cell shows its count and its row percentage
MEAN_AP = "val_mean_average_precision"  # metrics.csv's column with several labels per image
KEPT_COLOUR = "#f2b600"  # the epoch best.pt holds: gold, apart from the curves' own colours


Draw = TypeVar("Draw", bound=Callable[..., Any])


def _plain_text(draw: Draw) -> Draw:
    """Names are data, never markup: a '$' in a class or file name (`cost_$1_to_$2`) is drawn as typed instead of
    being parsed as mathtext (which fails on it and breaks the whole report)."""

    @functools.wraps(draw)
    def drawn(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn  # type: ignore[return-value]


def _plain_log_scale(axis: Any) -> None:
    """A log scale whose tick labels are plain text (`1e-03`): matplotlib's own are mathtext
    (`$\\mathdefault{10^{-3}}$`), which `_plain_text` would draw as typed."""
    axis.set_major_formatter(LogFormatter(base=10))
    axis.set_minor_formatter(LogFormatter(base=10, labelOnlyBase=False))


def _square_figure(n: int) -> tuple[Figure, Axes]:
    side = min(max(5.0, 0.45 * n + 3.0), 40.0)  # grows with the class count so labels stay legible
    fig = Figure(figsize=(side, side * 0.9), dpi=110)
    return fig, fig.subplots()


def _save(fig: Figure, path: Path | BinaryIO) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


@_plain_text
def plot_confusion_matrix(normalized: pd.DataFrame, counts: pd.DataFrame, path: Path, *, title: str) -> None:
    """Row-normalised colours with counts (and % for up to 12 classes) in the non-empty cells."""
    n = len(normalized)
    fig, ax = _square_figure(n)
    display = ConfusionMatrixDisplay(normalized.to_numpy(), display_labels=list(normalized.index))
    display.plot(ax=ax, cmap="Blues", colorbar=True, include_values=False, xticks_rotation=90 if n > 6 else 0)
    display.im_.set_clim(0.0, 1.0)
    if n <= CELL_TEXT_LIMIT:
        for i in range(n):
            for j in range(n):
                count, value = counts.iat[i, j], normalized.iat[i, j]
                if count:
                    ax.text(
                        j,
                        i,
                        f"{count}\n{value:.0%}" if n <= PERCENT_LIMIT else f"{count}",
                        ha="center",
                        va="center",
                        fontsize=9 if n <= PERCENT_LIMIT else 7,
                        color="white" if value > 0.5 else "black",
                    )
    _label_matrix(fig, ax, title)
    _save(fig, path)


def _label_matrix(fig: Figure, ax: Axes, title: str) -> None:
    """Axis names, and the title over the whole figure (wrapped to its width): an axes title of a matrix with a colour
    bar runs on under the bar."""
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 8)))


@_plain_text
def plot_confusion_difference(diff: pd.DataFrame, path: Path, *, title: str) -> None:
    """B - A of row-normalised matrices, coloured by what the change means: blue where B is better (more right
    answers on the diagonal, fewer confusions off it), red where B is worse. Cells show the signed change."""
    n = len(diff)
    fig, ax = _square_figure(n)
    values = diff.to_numpy()
    better = np.where(np.eye(n, dtype=bool), values, -values)  # fewer confusions are an improvement
    limit = max(float(np.abs(values).max()), 0.01)
    image = ax.imshow(better, cmap="RdBu", vmin=-limit, vmax=limit)
    ax.set_xticks(range(n), list(diff.columns), rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), list(diff.index))
    if n <= CELL_TEXT_LIMIT:
        for i in range(n):
            for j in range(n):
                if abs(values[i, j]) >= 0.005:
                    dark = abs(better[i, j]) > 0.6 * limit  # white text on the deep colours, black on the pale
                    ax.text(
                        j,
                        i,
                        f"{values[i, j]:+.0%}",
                        ha="center",
                        va="center",
                        fontsize=8 if n <= PERCENT_LIMIT else 6,
                        color="white" if dark else "black",
                    )
    bar = fig.colorbar(image, ax=ax)  # the colour is the improvement, not the signed change printed in the cells
    bar.set_ticks([-limit, 0.0, limit], labels=[f"B worse\nby {limit:.0%}", "no change", f"B better\nby {limit:.0%}"])
    _label_matrix(fig, ax, title)
    _save(fig, path)


@_plain_text
def plot_training_curves(history: pd.DataFrame, path: Path | BinaryIO, *, kept_epoch: int | None = None) -> None:
    """Loss, accuracy / macro-F1 and learning rate per epoch; dotted lines mark phase boundaries, a gold band and
    stars the kept epoch (the one best.pt holds)."""
    fig = Figure(figsize=(14, 3.8), dpi=110)
    axes = fig.subplots(1, 3)
    epochs = history["epoch"]
    axes[0].plot(epochs, history["train_loss"], "o-", label="train")
    axes[0].plot(epochs, history["val_loss"], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, history["train_accuracy"], "o-", label="train accuracy")
    axes[1].plot(epochs, history["val_accuracy"], "o-", label="val accuracy")
    axes[1].plot(epochs, history["val_macro_f1"], "s--", label="val macro-F1")
    if MEAN_AP in history:  # several labels per image: the metric the kept epoch was chosen by
        axes[1].plot(epochs, history[MEAN_AP], "d-", color="C4", label="val mAP")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("accuracy")
    axes[2].plot(epochs, history["lr"], "o-", color="C2")
    axes[2].set_yscale("log")
    _plain_log_scale(axes[2].yaxis)
    axes[2].set_title("learning rate (head, epoch start)")
    boundaries = history.loc[history["phase"].diff() > 0, "epoch"]
    for ax in axes:
        for epoch in boundaries:
            ax.axvline(epoch - 0.5, color="0.5", ls=":")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if kept_epoch is not None and (epochs == kept_epoch).any():
        _mark_kept(axes, history, kept_epoch)
    axes[0].legend()
    axes[1].legend(loc="lower right")
    _save(fig, path)


@_plain_text
def plot_fold_curves(folds: Sequence[tuple[str, pd.DataFrame, int | None]], path: Path | BinaryIO) -> None:
    """Cross-validation's training curves, every fold in one figure: (name, its metrics.csv, its kept epoch) each.
    Loss (val solid, train dashed) and val accuracy per epoch, one colour per fold, a star on each fold's kept epoch."""
    fig = Figure(figsize=(13, 4.2), dpi=110)
    loss, accuracy = fig.subplots(1, 2)
    for number, (name, history, kept) in enumerate(folds):
        colour, epochs = f"C{number % 10}", history["epoch"]
        loss.plot(epochs, history["val_loss"], "o-", color=colour, label=f"{name} val")
        loss.plot(epochs, history["train_loss"], "--", color=colour, alpha=0.6, label=f"{name} train")
        accuracy.plot(epochs, history["val_accuracy"], "o-", color=colour, label=name)
        row = history.loc[epochs == kept]
        if len(row):
            star = {"marker": "*", "color": KEPT_COLOUR, "ms": 15, "mec": colour, "mew": 1.5, "ls": "none", "zorder": 5}
            loss.plot([kept], [row["val_loss"].iloc[-1]], **star)
            accuracy.plot([kept], [row["val_accuracy"].iloc[-1]], **star)
    accuracy.plot([], [], "*", color=KEPT_COLOUR, ms=15, mec="k", ls="none", label="kept epoch")
    loss.set_title("loss (val solid, train dashed)")
    accuracy.set_title("val accuracy")
    accuracy.set_ylim(0, 1.02)
    for ax in (loss, accuracy):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    loss.legend(fontsize=8, ncol=2)
    accuracy.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def _mark_kept(axes: Sequence[Axes], history: pd.DataFrame, epoch: int) -> None:
    """A gold band over the kept epoch in every panel, and stars on its validation loss and accuracy (its mean
    average precision with several labels per image)."""
    row = history.loc[history["epoch"] == epoch].iloc[-1]
    for ax in axes:
        ax.axvspan(epoch - 0.35, epoch + 0.35, color=KEPT_COLOUR, alpha=0.2, lw=0)
    axes[0].plot([epoch], [row["val_loss"]], "*", color=KEPT_COLOUR, ms=16, mec="k", label=f"kept: epoch {epoch}")
    score = row[MEAN_AP] if MEAN_AP in history else row["val_accuracy"]
    axes[1].plot([epoch], [score], "*", color=KEPT_COLOUR, ms=16, mec="k", label=f"kept: epoch {epoch}")


def _reliability_panel(
    top: Axes, bottom: Axes, table: pd.DataFrame, title: str, confidence: str = "confidence (top-1 probability)"
) -> None:
    width = table["upper"] - table["lower"]
    filled = table["count"] > 0
    top.bar(
        table.loc[filled, "lower"],
        table.loc[filled, "accuracy"],
        width=width[filled],
        align="edge",
        color="C0",
        edgecolor="k",
        label="accuracy",
    )
    top.bar(
        table.loc[filled, "lower"],
        table.loc[filled, "confidence"] - table.loc[filled, "accuracy"],
        bottom=table.loc[filled, "accuracy"],
        width=width[filled],
        align="edge",
        fill=False,
        hatch="//",
        edgecolor="C3",
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.legend(loc="upper left")
    bottom.bar(table["lower"], table["count"], width=width, align="edge", color="0.6", edgecolor="k")
    bottom.set_xlabel(confidence)
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)


@_plain_text
def plot_reliability(
    table: pd.DataFrame,
    ece: float,
    path: Path,
    *,
    before: pd.DataFrame | None = None,
    ece_before: float | None = None,
    confidence: str = "confidence (top-1 probability)",
) -> None:
    """Accuracy per confidence bin against the diagonal, with the confidence histogram below; with `before`,
    the uncalibrated diagram on the left and the temperature-scaled one on the right."""
    panels = [(before, f"before temperature (ECE {ece_before:.3f})")] if before is not None and ece_before is not None else []
    panels.append((table, f"{'after temperature' if panels else 'reliability'} (ECE {ece:.3f})"))
    fig = Figure(figsize=(5.5 * len(panels), 6.5), dpi=110)
    axes = fig.subplots(2, len(panels), gridspec_kw={"height_ratios": [3, 1]}, sharex=True, squeeze=False)
    for column, (data, title) in enumerate(panels):
        _reliability_panel(axes[0, column], axes[1, column], data, title, confidence)
    _save(fig, path)


@_plain_text
def plot_risk_coverage(risk: pd.DataFrame, path: Path) -> None:
    """Accuracy of the answered images against the share answered, as the confidence threshold rises."""
    fig = Figure(figsize=(6.5, 4.2), dpi=110)
    ax = fig.subplots()
    floor = min(MIN_ANSWERED, int(risk["answered"].max())) if len(risk) else 0
    steady = risk[risk["answered"] >= floor]  # the accuracy of 1-2 answered images is noise, not a curve
    ax.plot(steady["coverage"], steady["accuracy"], "-", color="C0", lw=2)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy of the answered images")
    ax.set_title("accuracy vs coverage: answer only above a confidence threshold")
    ax.grid(alpha=0.3)
    if len(steady) < len(risk):
        ax.text(0.01, 0.02, f"from {MIN_ANSWERED} answered images on", transform=ax.transAxes, fontsize=8, color="0.4")
    low = float(steady["accuracy"].min())
    ax.set_ylim(max(0.0, low - 0.05), 1.01)
    _save(fig, path)


@_plain_text
def plot_image_grid(images: Sequence[np.ndarray], captions: Sequence[str], path: Path, *, columns: int) -> None:
    """A grid of RGB uint8 images (augmentation preview): one mosaic in one axes, each row labelled with the first
    caption of its row, the columns numbered (one axes instead of one per picture: a tenth of the drawing time)."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    gap = max(2, height // 16)
    mosaic = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = (k // columns) * (height + gap), (k % columns) * (width + gap)
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        mosaic[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb[..., :3]
    fig = Figure(figsize=(2.2 * columns, 2.2 * rows + 0.3), dpi=100)
    ax = fig.subplots()
    ax.imshow(mosaic, interpolation="nearest" if height < 96 else "antialiased")
    ax.set_xticks([c * (width + gap) + width / 2 for c in range(columns)], [f"view {c + 1}" for c in range(columns)])
    ax.set_yticks(
        [r * (height + gap) + height / 2 for r in range(rows)], [captions[r * columns].split(" #")[0] for r in range(rows)]
    )
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    _save(fig, path)


@_plain_text
def plot_lr_curve(curve: pd.DataFrame, suggestion: float, path: Path) -> None:
    """lr-find's loss against the learning rate (log scale), smoothed, with the suggestion marked."""
    _save(lr_curve_figure(curve, suggestion), path)


@_plain_text
def lr_curve_figure(curve: pd.DataFrame, suggestion: float) -> Figure:
    """The figure of `plot_lr_curve`: the raw loss visible under the smoothed one (major gridlines only, faint), and
    where the loss blows up, an arrow to the last point still inside the plot (the curve leaves it there)."""
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.subplots()
    lrs, smoothed = curve["lr"].to_numpy(float), curve["smoothed"].to_numpy(float)
    ax.plot(lrs, curve["loss"], color="0.45", lw=0.9, alpha=0.7, label="loss (each step)", zorder=2)
    ax.plot(lrs, smoothed, color="C0", lw=2, label="smoothed", zorder=3)
    ax.axvline(suggestion, color="C3", ls="--", label=f"suggested lr {suggestion:.2g}", zorder=4)
    ax.set_xscale("log")
    _plain_log_scale(ax.xaxis)
    ax.set_xlim(lrs[0] / 1.5, lrs[-1] * 1.5)
    ax.set_xlabel("learning rate (first phase, head group)")
    ax.set_ylabel("training loss")
    finite = smoothed[np.isfinite(smoothed)]
    low, start, end = float(finite.min()), float(finite[0]), float(smoothed[-1])
    # show where it diverges without flattening the descent (an infinite last loss counts as above everything)
    high = max(start, min(end if np.isfinite(end) else np.inf, start + 3 * abs(start - low)))
    top = high + 0.15 * abs(high - low) + 1e-6
    ax.set_ylim(low - 0.1 * abs(high - low), top)
    if not np.isfinite(end) or end > start:
        inside = np.flatnonzero(np.isfinite(smoothed) & (smoothed <= top))
        last = int(inside[-1])  # the curve leaves the plot after this point (or ends on it)
        ax.annotate(
            f"diverges (stopped at lr {lrs[-1]:.2g})",
            xy=(lrs[last], smoothed[last]),
            # left of the point (a range test diverges near its right end), clear of it in height
            xytext=(lrs[last] / 8, 0.6 if smoothed[last] > (low + top) / 2 else 0.85),
            textcoords=("data", "axes fraction"),
            ha="right",
            va="center",
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "none", "alpha": 0.85},
            arrowprops={"arrowstyle": "->", "color": "C3"},
            color="C3",
            zorder=5,
        )
    ax.legend(loc="lower left")
    ax.grid(which="major", color="0.9", lw=0.6, zorder=0)  # no minor grid: on a log axis it hides the raw curve
    return fig


@_plain_text
def plot_pr_curves(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float, float]], path: Path) -> None:
    """One precision-recall curve per class (several labels per image), its AP in the legend. Each entry is (name,
    precision, recall, AP, threshold): the curve's points, then as the arrays' last point the operating point of the
    class's chosen threshold, drawn as a dot."""
    fig = Figure(figsize=(7.5, 5.5), dpi=110)
    ax = fig.subplots()
    for k, (name, precision, recall, ap, _) in enumerate(curves):
        colour = f"C{k % 10}"
        ax.step(recall[:-1], precision[:-1], where="post", color=colour, lw=1.6, label=f"{name} (AP {ap:.3f})")
        ax.plot([recall[-1]], [precision[-1]], "o", color=colour, ms=6, mec="k")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall per class (dot: the chosen threshold)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=1 if len(curves) <= 12 else 2)
    _save(fig, path)


@_plain_text
def plot_labelled_grid(rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]], path: Path, *, columns: int) -> None:
    """Rows of pictures, each row titled on its left (e.g. 'cat: false positive') and each picture captioned under it
    (e.g. 'p 0.97'); a row with fewer pictures leaves its last cells empty."""
    fig = Figure(figsize=(1.9 * columns + 1.6, 2.1 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (title, pictures) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(pictures):
                image, caption = pictures[c]
                ax.imshow(image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2), interpolation="antialiased")
                ax.set_xlabel(caption, fontsize=8)
        axes[r, 0].set_ylabel(textwrap.fill(title, 18), fontsize=9, rotation=0, ha="right", va="center")
    _save(fig, path)
