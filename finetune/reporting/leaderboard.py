"""`finetune compare`'s leaderboard for people: times and sizes as one reads them ('1 min 26 s', '11.2 M'), as
Markdown (leaderboard.md), a self-contained page (leaderboard.html) and the table the terminal prints."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

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


def leaderboard_table(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard's columns as shown (strings), best macro-F1 first, without the report links."""
    folds = (
        {
            "macro-F1 per fold (mean ± sd)": [
                f"{m:.3f} ± {s:.3f}" for m, s in zip(board["macro_f1_fold_mean"], board["macro_f1_fold_std"])
            ]
        }
        if "macro_f1_fold_mean" in board
        else {}
    )
    return pd.DataFrame(
        {
            "recipe": board["recipe"],
            "model": board["model"],
            "accuracy (95% CI)": [
                f"{a:.1%} ({lo:.1%}-{hi:.1%})" for a, lo, hi in zip(board["accuracy"], board["accuracy_lo"], board["accuracy_hi"])
            ],
            "macro-F1": board["macro_f1"].map("{:.3f}".format),
            "macro-F1 vs leader (paired 95% CI)": board["vs_leader"],
            **folds,
            "worst class (recall)": [f"{c} ({r:.0%})" for c, r in zip(board["worst_class"], board["worst_class_recall"])],
            "params": board["params"].map(count),
            "GMACs": board["gmacs"].map("{:.2f}".format),
            "trainable params": board["trainable_params"].map(count),
            "epochs": board["epochs"].map(str),
            "time": board["seconds"].map(duration),
        }
    )


def seeds_table(means: pd.DataFrame, seeds: int) -> pd.DataFrame:
    """Mean and spread over seeds per recipe, as shown."""
    return pd.DataFrame(
        {
            "recipe": means["recipe"],
            f"accuracy, mean ± sd of {seeds} seeds": [
                f"{m:.1%} ± {s:.1%}" for m, s in zip(means["accuracy_mean"], means["accuracy_std"])
            ],
            "mean 95% CI of one run": [
                f"{lo:.1%}-{hi:.1%}" for lo, hi in zip(means["accuracy_ci_lo_mean"], means["accuracy_ci_hi_mean"])
            ],
            "macro-F1, mean ± sd": [f"{m:.3f} ± {s:.3f}" for m, s in zip(means["macro_f1_mean"], means["macro_f1_std"])],
            "time per run": means["seconds_mean"].map(duration),
        }
    )


def _intro(board: pd.DataFrame, data: str | Path, split: str) -> str:
    return (
        f"{len(board)} recipes on {data}, every one on the same {split} split; best macro-F1 first. A difference whose "
        "paired interval holds 0 is within the noise of this test set."
    )


SEEDS_NOTE = (
    "Each recipe trained with seeds 0..{last} on the same split: the spread is training noise alone; the interval is "
    "the test set's sampling noise for one run."
)


def leaderboard_markdown(
    board: pd.DataFrame, *, data: str | Path, split: str, means: pd.DataFrame | None = None, seeds: int = 1
) -> str:
    """leaderboard.md: the table with a link to every run's report.html, then the means over seeds if any."""
    names = ["recipe", "model", "worst_class"]  # escaped before the cells are composed ('cat|dog (40%)')
    named = board.assign(**{column: board[column].map(escape_markdown) for column in names})
    shown = leaderboard_table(named).assign(report=[markdown_link("report.html", r) for r in board["report"]])
    intro = _intro(board, escape_markdown(data), escape_markdown(split))
    text = f"# Leaderboard\n\n{intro}\n\n" + markdown_table(shown) + "\n"
    if means is not None:
        seeds_shown = seeds_table(means.assign(recipe=means["recipe"].map(escape_markdown)), seeds)
        text += f"\n## Over seeds\n\n{SEEDS_NOTE.format(last=seeds - 1)}\n\n" + markdown_table(seeds_shown) + "\n"
    return text


def write_leaderboard_html(
    board: pd.DataFrame, path: Path, *, data: str | Path, split: str, means: pd.DataFrame | None = None, seeds: int = 1
) -> None:
    """leaderboard.html beside leaderboard.md: the same tables, each run's report one click away."""
    shown = leaderboard_table(board).assign(report=[relative_link("report.html", r) for r in board["report"]])
    sections = [Section("Runs", table=shown)]
    if means is not None:
        sections.append(Section("Over seeds", paragraphs=[SEEDS_NOTE.format(last=seeds - 1)], table=seeds_table(means, seeds)))
    write_page(path, title="Leaderboard", intro=[_intro(board, data, split)], sections=sections)
