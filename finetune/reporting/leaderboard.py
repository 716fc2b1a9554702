"""`finetune compare`'s leaderboard for people: times and sizes as one reads them ('1 min 26 s', '11.2 M'), as
Markdown (leaderboard.md), a self-contained page (leaderboard.html) and the table the terminal prints. The columns
follow the task's metric family: accuracy and recall for one label per image, mAP and AP for several."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from finetune.inference.task import SingleLabel, Task
from finetune.reporting.markdown import escape_markdown, markdown_link, markdown_table
from finetune.reporting.page import Section, relative_link, write_page


def duration(seconds: float) -> str:
    """'45 s', '1 min 26 s', '2 h 05 min'."""
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def count(n: float) -> str:
    """A parameter count: '11.2 M' from 100,000 up, else every digit ('1,539')."""
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{int(n):,}"


TITLES = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "mean_average_precision": "mAP",
    "recall": "recall",
    "average_precision": "AP",
}  # the board's metrics as its column headers say them
FORMATS = {"accuracy": "{:.1%}", "recall": "{:.0%}", "mean_average_precision": "{:.3f}", "average_precision": "{:.2f}"}


def _shown(metric: str, value: float) -> str:
    return FORMATS.get(metric, "{:.3f}").format(value)


def leaderboard_table(board: pd.DataFrame, *, task: Task = SingleLabel()) -> pd.DataFrame:
    """The leaderboard's columns as shown (strings), best first (macro-F1, or mAP with several labels per image),
    without the report links."""
    family = task.metric_family
    score, ranked, worst = family.headline, family.rank_by, family.worst_class_by
    folds = (
        {
            f"{TITLES[ranked]} per fold (mean ± sd)": [
                f"{m:.3f} ± {s:.3f}" for m, s in zip(board[f"{ranked}_fold_mean"], board[f"{ranked}_fold_std"])
            ]
        }
        if f"{ranked}_fold_mean" in board
        else {}
    )
    return pd.DataFrame(
        {
            "recipe": board["recipe"],
            "model": board["model"],
            f"{TITLES[score]} (95% CI)": [
                f"{_shown(score, a)} ({_shown(score, lo)}-{_shown(score, hi)})"
                for a, lo, hi in zip(board[score], board[f"{score}_lo"], board[f"{score}_hi"])
            ],
            "macro-F1": board["macro_f1"].map("{:.3f}".format),
            f"{TITLES[ranked]} vs leader (paired 95% CI)": board["vs_leader"],
            **folds,
            f"worst class ({TITLES[worst]})": [
                f"{c}: {TITLES[worst]} {_shown(worst, r)}"  # "7: AP 0.81", not "7 (0.81)", which reads as a count
                for c, r in zip(board["worst_class"], board[f"worst_class_{worst}"])
            ],
            "params": board["params"].map(count),
            "GMACs": board["gmacs"].map("{:.2f}".format),
            "trainable params": board["trainable_params"].map(count),
            "epochs": board["epochs"].map(str),
            "time": board["seconds"].map(duration),
        }
    )


def seeds_table(means: pd.DataFrame, seeds: int, *, task: Task = SingleLabel()) -> pd.DataFrame:
    """Mean and spread over seeds per recipe, as shown."""
    score = task.metric_family.headline
    show = lambda v: _shown(score, v)  # noqa: E731
    return pd.DataFrame(
        {
            "recipe": means["recipe"],
            f"{TITLES[score]}, mean ± sd of {seeds} seeds": [
                f"{show(m)} ± {show(s)}" for m, s in zip(means[f"{score}_mean"], means[f"{score}_std"])
            ],
            "mean 95% CI of one run": [
                f"{show(lo)}-{show(hi)}" for lo, hi in zip(means[f"{score}_ci_lo_mean"], means[f"{score}_ci_hi_mean"])
            ],
            "macro-F1, mean ± sd": [f"{m:.3f} ± {s:.3f}" for m, s in zip(means["macro_f1_mean"], means["macro_f1_std"])],
            "time per run": means["seconds_mean"].map(duration),
        }
    )


def _intro(board: pd.DataFrame, data: str | Path, split: str, task: Task) -> str:
    return (
        f"{len(board)} recipes on {data}, every one on the same {split} split; best {TITLES[task.metric_family.rank_by]} "
        "first. A difference whose paired interval holds 0 is within the noise of this test set."
    )


SEEDS_NOTE = (
    "Each recipe trained with seeds 0..{last} on the same split: the spread is training noise alone; the interval is "
    "the test set's sampling noise for one run."
)


def leaderboard_markdown(
    board: pd.DataFrame,
    *,
    data: str | Path,
    split: str,
    means: pd.DataFrame | None = None,
    seeds: int = 1,
    task: Task = SingleLabel(),
) -> str:
    """leaderboard.md: the table with a link to every run's report.html, then the means over seeds if any."""
    names = ["recipe", "model", "worst_class"]  # escaped before the cells are composed ('cat|dog (40%)')
    named = board.assign(**{column: board[column].map(escape_markdown) for column in names})
    shown = leaderboard_table(named, task=task).assign(report=[markdown_link("report.html", r) for r in board["report"]])
    intro = _intro(board, escape_markdown(data), escape_markdown(split), task)
    text = f"# Leaderboard\n\n{intro}\n\n" + markdown_table(shown) + "\n"
    if means is not None:
        seeds_shown = seeds_table(means.assign(recipe=means["recipe"].map(escape_markdown)), seeds, task=task)
        text += f"\n## Over seeds\n\n{SEEDS_NOTE.format(last=seeds - 1)}\n\n" + markdown_table(seeds_shown) + "\n"
    return text


def write_leaderboard_html(
    board: pd.DataFrame,
    path: Path,
    *,
    data: str | Path,
    split: str,
    means: pd.DataFrame | None = None,
    seeds: int = 1,
    task: Task = SingleLabel(),
) -> None:
    """leaderboard.html beside leaderboard.md: the same tables, each run's report one click away."""
    shown = leaderboard_table(board, task=task).assign(report=[relative_link("report.html", r) for r in board["report"]])
    sections = [Section("Runs", table=shown)]
    if means is not None:
        sections.append(
            Section("Over seeds", paragraphs=[SEEDS_NOTE.format(last=seeds - 1)], table=seeds_table(means, seeds, task=task))
        )
    write_page(path, title="Leaderboard", intro=[_intro(board, data, split, task)], sections=sections)
