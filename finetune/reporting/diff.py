"""`finetune report diff RUN_A RUN_B`: what a change fixed and what it broke, per class and per confusion cell.

Two reports of several labels per image are diffed the same way: the headline's paired bootstrap is of mAP and
macro-F1, the per-class deltas are of AP (and of precision, recall and F1 at each run's own thresholds), and the
matrix whose change is shown is the label co-occurrence (true labels against predicted ones)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.errors import DataError, RunDirError, UsageError
from finetune.evaluation.intervals import Difference, paired_difference
from finetune.evaluation.multilabel import paired_multilabel_tables
from finetune.files import read_table, read_text_table, replaced_folder, write_table, write_text
from finetune.inference.task import DEFAULT_TASK, MultiLabel, SingleLabel, Task, task_named
from finetune.reporting.markdown import escape_markdown, markdown_table
from finetune.reporting.page import Section, write_page
from finetune.reporting.plots import plot_confusion_difference
from finetune.run_dir import RunDir, check_destination

TITLES = {"f1": "F1", "average_precision": "AP"}  # the per-class metric whose moves list a class as fixed or broken


@dataclass
class ReportDiff:
    folder: Path
    per_class: pd.DataFrame
    headline: pd.DataFrame


def _report_folder(path: Path) -> tuple[Path, Task]:
    """The report folder of `path` (a run folder or a report folder) and the task it was scored for."""
    for candidate in (RunDir(path).report, path):
        metrics = candidate / "metrics.json"
        if (candidate / "per_class.csv").exists() and metrics.exists():
            task = task_named(str(json.loads(metrics.read_text(encoding="utf-8")).get("task", DEFAULT_TASK)))
            if (candidate / KINDS[task.name].matrix).exists():
                return candidate, task
    raise RunDirError(
        f"{path} holds no report (metrics.json, per_class.csv, confusion_matrix.csv or cooccurrence.csv); "
        "run 'finetune eval' or pass a run folder"
    )


def _per_class_diff(folder_a: Path, folder_b: Path, task: Task) -> pd.DataFrame:
    """B - A of each per-class metric the task's reports hold, worst change (of F1, or AP) first."""
    family = task.metric_family
    a = read_table(folder_a / "per_class.csv", dtype={"class": str}, keep_default_na=False)
    b = read_table(folder_b / "per_class.csv", dtype={"class": str}, keep_default_na=False)
    if set(a["class"]) != set(b["class"]):
        only = sorted(set(a["class"]) ^ set(b["class"]))
        raise DataError(f"the two reports have different classes (only in one: {only}); compare runs of the same dataset")
    merged = a.merge(b, on="class", suffixes=("_a", "_b"))
    for metric in family.per_class:
        merged[f"{metric}_delta"] = merged[f"{metric}_b"] - merged[f"{metric}_a"]
    columns = ["class"] + [f"{m}_{s}" for m in family.per_class for s in ("a", "b", "delta")] + ["support_a", "support_b"]
    return merged[columns].sort_values(f"{family.per_class_rank_by}_delta").reset_index(drop=True)


def _read_counts(path: Path) -> pd.DataFrame:
    counts = read_table(path, index_col=0, dtype={0: str}, keep_default_na=False)
    counts.index = counts.index.astype(str)
    counts.columns = counts.columns.astype(str)
    return counts


def _confusion_rates(folder: Path) -> pd.DataFrame:
    """The confusion matrix, each row over its true class's images (the row's sum)."""
    counts = _read_counts(folder / "confusion_matrix.csv")
    return counts.div(counts.sum(axis=1).replace(0, 1), axis=0)


def _cooccurrence_rates(folder: Path) -> pd.DataFrame:
    """The label co-occurrence (images with true label i and predicted label j), each row over the images carrying
    label i (the class's support): the diagonal is each class's recall."""
    counts = _read_counts(folder / "cooccurrence.csv")
    per_class = read_table(folder / "per_class.csv", dtype={"class": str}, keep_default_na=False)
    support = per_class.set_index("class")["support"].reindex(counts.index).fillna(0)
    return counts.div(support.replace(0, 1), axis=0)


def _confusion_diff(folder_a: Path, folder_b: Path, task: Task) -> pd.DataFrame:
    """B - A of the row-normalised matrices (confusion, or label co-occurrence), in A's class order."""
    rates = KINDS[task.name].rates
    rates_a, rates_b = rates(folder_a), rates(folder_b)
    order = list(rates_a.index)
    return rates_b.loc[order, order] - rates_a.loc[order, order]


def _headline_diff(folder_a: Path, folder_b: Path, task: Task) -> pd.DataFrame:
    """Every float metric of both reports, B - A, and, for the metrics a paired test covers, its interval and verdict."""
    metrics_a = json.loads((folder_a / "metrics.json").read_text(encoding="utf-8"))
    metrics_b = json.loads((folder_b / "metrics.json").read_text(encoding="utf-8"))
    keys = [k for k, v in metrics_a.items() if isinstance(v, float) and isinstance(metrics_b.get(k), float)]
    headline = pd.DataFrame({"metric": keys, "a": [metrics_a[k] for k in keys], "b": [metrics_b[k] for k in keys]})
    headline["delta"] = headline["b"] - headline["a"]
    tested = {d.metric: d for d in _paired(folder_a, folder_b, task)}
    headline["delta_lo"] = [tested[k].low if k in tested else float("nan") for k in keys]
    headline["delta_hi"] = [tested[k].high if k in tested else float("nan") for k in keys]
    headline["verdict"] = [tested[k].verdict if k in tested else "" for k in keys]
    return headline


def _paired(folder_a: Path, folder_b: Path, task: Task) -> list[Difference]:
    """Paired bootstrap of B - A when both reports scored the same images with the same labels; else nothing."""
    return KINDS[task.name].paired(read_text_table(folder_a / "predictions.csv"), read_text_table(folder_b / "predictions.csv"))


def _one_label_paired(a: pd.DataFrame, b: pd.DataFrame) -> list[Difference]:
    """Accuracy, balanced accuracy and macro-F1 of two one-label predictions tables of the same images."""
    if "true_label" not in a or "true_label" not in b or set(a["path"]) != set(b["path"]) or len(a) != len(b):
        return []
    b = b.set_index("path").loc[a["path"]]
    if (b["true_label"].to_numpy() != a["true_label"].to_numpy()).any():
        return []
    classes = sorted(set(a["true_label"]) | set(a["predicted_label"]) | set(b["predicted_label"]))
    code = {c: i for i, c in enumerate(classes)}
    encode = lambda column: np.array([code[v] for v in column])  # noqa: E731
    return paired_difference(encode(a["true_label"]), encode(a["predicted_label"]), encode(b["predicted_label"]), len(classes))


@dataclass(frozen=True)
class _Kind:
    """What a diff reads and says of one task's reports."""

    matrix: str  # the report's true x predicted table
    rates: Callable[[Path], pd.DataFrame]  # that table, each row over its true class's images
    paired: Callable[[pd.DataFrame, pd.DataFrame], list[Difference]]  # the paired test of two predictions.csv
    change: str  # what the matrix's change shows (the plot's title)
    grew: str  # the headings of the off-diagonal cells that grew and shrank
    shrank: str


KINDS = {
    SingleLabel.name: _Kind(
        matrix="confusion_matrix.csv",
        rates=_confusion_rates,
        paired=_one_label_paired,
        change="confusion change (B - A, row-normalised)",
        grew="Confusions that grew most (B sends more of the true class there)",
        shrank="Confusions that shrank most",
    ),
    MultiLabel.name: _Kind(
        matrix="cooccurrence.csv",
        rates=_cooccurrence_rates,
        paired=paired_multilabel_tables,
        change="label co-occurrence change (B - A, rows over each true label's images)",
        grew="Predicted labels that grew most on images of another label (B adds the column's label to more of them)",
        shrank="Predicted labels that shrank most on images of another label",
    ),
}

MIN_F1_CHANGE = 0.02  # smaller per-class F1 (or AP) moves are listed as unchanged: on small splits they are an image or two


def _changes(per_class: pd.DataFrame, positive: bool, *, by: str = "f1", name: Callable[[Any], str] = str) -> str:
    """'cat (+0.120), dog (+0.031)': the classes whose `by` (F1, or AP) moved that way, each name through `name`
    (escaped for Markdown)."""
    delta = per_class[f"{by}_delta"]
    moved = delta >= MIN_F1_CHANGE if positive else delta <= -MIN_F1_CHANGE
    chosen = per_class[moved].sort_values(f"{by}_delta", ascending=not positive)
    return ", ".join(f"{name(c)} ({d:+.3f})" for c, d in zip(chosen["class"], chosen[f"{by}_delta"])) or "none"


def _fixed_and_broke(per_class: pd.DataFrame, task: Task, *, name: Callable[[Any], str] = str) -> tuple[str, str]:
    by = task.metric_family.per_class_rank_by
    return (
        f"Fixed ({TITLES[by]} up by {MIN_F1_CHANGE} or more): {_changes(per_class, True, by=by, name=name)}",
        f"Broke ({TITLES[by]} down by {MIN_F1_CHANGE} or more): {_changes(per_class, False, by=by, name=name)}",
    )


def _confusion_cells(confusion: pd.DataFrame, *, grew: bool, limit: int = 5) -> str:
    """Off-diagonal cells whose share of the true class rose (grew) or fell (shrank), largest change first."""
    cells = confusion.stack().rename("change").reset_index()
    cells.columns = ["true", "predicted", "change"]
    off = cells[cells["true"] != cells["predicted"]]
    chosen = off[off["change"] > 0] if grew else off[off["change"] < 0]
    chosen = chosen.sort_values("change", ascending=not grew).head(limit)
    return markdown_table(chosen, names=["true", "predicted"], floatfmt="+.3f") if len(chosen) else "none"


def _markdown(
    folder_a: Path, folder_b: Path, headline: pd.DataFrame, per_class: pd.DataFrame, confusion: pd.DataFrame, task: Task
) -> str:
    kind = KINDS[task.name]
    fixed, broke = _fixed_and_broke(per_class, task, name=escape_markdown)
    tested = headline[headline["verdict"] != ""]
    noise = (
        "Paired bootstrap on the same images (B - A, 95% interval): "
        + "; ".join(f"{r.metric} {r.delta:+.4f} [{r.delta_lo:+.4f}, {r.delta_hi:+.4f}]: {r.verdict}" for r in tested.itertuples())
        if len(tested)
        else "The two reports scored different images: no paired test; compare the intervals of each report."
    )
    shown = pd.DataFrame(
        {
            "metric": headline["metric"],
            "a": headline["a"].map("{:.4f}".format),
            "b": headline["b"].map("{:.4f}".format),
            "B - A": headline["delta"].map("{:+.4f}".format),
            "verdict": headline["verdict"],
        }
    )
    return "\n".join(
        [
            "# Report diff",
            "",
            f"A: {escape_markdown(folder_a)}  ",
            f"B: {escape_markdown(folder_b)}",
            "",
            f"**{noise}**",
            "",
            markdown_table(shown, names=["metric"]),
            "",
            f"## {fixed}",
            "",
            f"## {broke}",
            "",
            "_Per-class moves are listed by size, not tested against noise: trust them as far as the paired verdict above._",
            "",
            f"## {kind.grew}",
            "",
            _confusion_cells(confusion, grew=True),
            "",
            f"## {kind.shrank}",
            "",
            _confusion_cells(confusion, grew=False),
            "",
            "## Per class",
            "",
            markdown_table(per_class, names=["class"], floatfmt=".3f"),
            "",
        ]
    )


def _cells_table(confusion: pd.DataFrame, *, grew: bool, limit: int = 5) -> pd.DataFrame | None:
    cells = confusion.stack().rename("change").reset_index()
    cells.columns = ["true", "predicted", "change"]
    off = cells[cells["true"] != cells["predicted"]]
    chosen = (off[off["change"] > 0] if grew else off[off["change"] < 0]).sort_values("change", ascending=not grew).head(limit)
    return chosen.assign(change=chosen["change"].map("{:+.1%}".format)) if len(chosen) else None


def _write_html(
    path: Path,
    folder_a: Path,
    folder_b: Path,
    headline: pd.DataFrame,
    per_class: pd.DataFrame,
    confusion: pd.DataFrame,
    task: Task,
) -> None:
    """diff.html: diff.md's content on one self-contained page, the confusion (or co-occurrence) change inline."""
    kind = KINDS[task.name]
    tested = headline[headline["verdict"] != ""]
    verdict = (
        "; ".join(f"{r.metric} {r.delta:+.4f} [{r.delta_lo:+.4f}, {r.delta_hi:+.4f}]: {r.verdict}" for r in tested.itertuples())
        if len(tested)
        else "The two reports scored different images: no paired test; compare the intervals of each report."
    )
    metrics = pd.DataFrame(
        {
            "metric": headline["metric"],
            "A": headline["a"].map("{:.4f}".format),
            "B": headline["b"].map("{:.4f}".format),
            "B - A": headline["delta"].map("{:+.4f}".format),
            "verdict": headline["verdict"],
        }
    )
    classes = per_class.assign(
        **{c: per_class[c].map("{:+.3f}".format if c.endswith("delta") else "{:.3f}".format) for c in per_class.columns[1:-2]}
    )
    grew, shrank = _cells_table(confusion, grew=True), _cells_table(confusion, grew=False)
    sections = [
        Section("Headline", banner=f"Paired bootstrap on the same images (B - A, 95% interval): {verdict}", table=metrics),
        Section(
            "Fixed and broke",
            paragraphs=[
                *_fixed_and_broke(per_class, task),
                "Per-class moves are listed by size, not tested against noise: trust them as far as the paired verdict above.",
            ],
        ),
        Section(
            kind.change[0].upper() + kind.change[1:],
            paragraphs=["Blue: B better (more right answers on the diagonal, fewer confusions off it); red: B worse."],
            figure=path.parent / "confusion_diff.png",
        ),
        Section(kind.grew, paragraphs=[] if grew is not None else ["none"], table=grew),
        Section(kind.shrank, paragraphs=[] if shrank is not None else ["none"], table=shrank),
        Section(f"Per class (worst {TITLES[task.metric_family.per_class_rank_by]} change first)", table=classes),
    ]
    write_page(path, title="Report diff", intro=[f"A: {folder_a}", f"B: {folder_b}"], sections=sections)


def diff_reports(*, run_a: str | Path, run_b: str | Path, out: str | Path) -> ReportDiff:
    """Per-class metric deltas (B - A), confusion difference and headline deltas, as CSV, PNG, Markdown and HTML.

    Two reports of several labels per image: the paired test is of mAP and macro-F1, the per-class deltas are of AP,
    threshold, precision, recall and F1, and confusion_diff.csv/.png hold the change of the label co-occurrence. A
    report of one kind against one of the other is refused."""
    out = check_destination(out, reads=[Path(run_a), Path(run_b)])
    (folder_a, task), (folder_b, task_b) = _report_folder(Path(run_a)), _report_folder(Path(run_b))
    if task.name != task_b.name:
        raise UsageError(
            f"{run_a} holds a report of {task.described} but {run_b} a report of {task_b.described}; "
            "report diff compares two reports of the same kind: diff each against a run of its own kind"
        )
    per_class = _per_class_diff(folder_a, folder_b, task)
    confusion = _confusion_diff(folder_a, folder_b, task)
    headline = _headline_diff(folder_a, folder_b, task)
    with replaced_folder(out, marker="diff.md") as staging:  # swapped in whole: never two diffs mixed
        write_table(per_class, staging / "per_class_diff.csv", float_format="%.6f")
        write_table(confusion, staging / "confusion_diff.csv", index=True, float_format="%.6f")
        write_table(headline, staging / "metrics_diff.csv", float_format="%.6f")
        plot_confusion_difference(confusion, staging / "confusion_diff.png", title=KINDS[task.name].change)
        write_text(staging / "diff.md", _markdown(folder_a, folder_b, headline, per_class, confusion, task))
        _write_html(staging / "diff.html", folder_a, folder_b, headline, per_class, confusion, task)
    return ReportDiff(folder=out, per_class=per_class, headline=headline)
