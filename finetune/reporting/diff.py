"""`finetune report diff RUN_A RUN_B`: what a change fixed and what it broke, per class and per confusion cell."""

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
from finetune.files import read_table, read_text_table, replaced_folder, write_table, write_text
from finetune.reporting.markdown import escape_markdown, markdown_table
from finetune.reporting.page import Section, write_page
from finetune.reporting.plots import plot_confusion_difference
from finetune.run_dir import RunDir, check_destination

METRICS = ("precision", "recall", "f1")


@dataclass
class ReportDiff:
    folder: Path
    per_class: pd.DataFrame
    headline: pd.DataFrame


def _report_folder(path: Path) -> Path:
    for candidate in (RunDir(path).report, path):
        if (candidate / "cooccurrence.csv").exists():
            raise UsageError(
                f"{path} holds a report of several labels per image; report diff compares one-label reports for now: "
                "compare their metrics.json and per_class.csv"
            )
        if (candidate / "per_class.csv").exists() and (candidate / "confusion_matrix.csv").exists():
            return candidate
    raise RunDirError(f"{path} holds no report (per_class.csv, confusion_matrix.csv); run 'finetune eval' or pass a run folder")


def _normalized(counts: pd.DataFrame) -> pd.DataFrame:
    return counts.div(counts.sum(axis=1).replace(0, 1), axis=0)


def _per_class_diff(folder_a: Path, folder_b: Path) -> pd.DataFrame:
    a = read_table(folder_a / "per_class.csv", dtype={"class": str}, keep_default_na=False)
    b = read_table(folder_b / "per_class.csv", dtype={"class": str}, keep_default_na=False)
    if set(a["class"]) != set(b["class"]):
        only = sorted(set(a["class"]) ^ set(b["class"]))
        raise DataError(f"the two reports have different classes (only in one: {only}); compare runs of the same dataset")
    merged = a.merge(b, on="class", suffixes=("_a", "_b"))
    for metric in METRICS:
        merged[f"{metric}_delta"] = merged[f"{metric}_b"] - merged[f"{metric}_a"]
    columns = ["class"] + [f"{m}_{s}" for m in METRICS for s in ("a", "b", "delta")] + ["support_a", "support_b"]
    return merged[columns].sort_values("f1_delta").reset_index(drop=True)


def _read_counts(folder: Path) -> pd.DataFrame:
    counts = read_table(folder / "confusion_matrix.csv", index_col=0, dtype={0: str}, keep_default_na=False)
    counts.index = counts.index.astype(str)
    return counts


def _confusion_diff(folder_a: Path, folder_b: Path) -> pd.DataFrame:
    """B - A of the row-normalised confusion matrices, in A's class order."""
    counts_a, counts_b = _read_counts(folder_a), _read_counts(folder_b)
    order = list(counts_a.index)
    return _normalized(counts_b.loc[order, order]) - _normalized(counts_a.loc[order, order])


def _headline_diff(folder_a: Path, folder_b: Path) -> pd.DataFrame:
    """Every float metric of both reports, B - A, and, for the metrics a paired test covers, its interval and verdict."""
    metrics_a = json.loads((folder_a / "metrics.json").read_text(encoding="utf-8"))
    metrics_b = json.loads((folder_b / "metrics.json").read_text(encoding="utf-8"))
    keys = [k for k, v in metrics_a.items() if isinstance(v, float) and isinstance(metrics_b.get(k), float)]
    headline = pd.DataFrame({"metric": keys, "a": [metrics_a[k] for k in keys], "b": [metrics_b[k] for k in keys]})
    headline["delta"] = headline["b"] - headline["a"]
    tested = {d.metric: d for d in _paired(folder_a, folder_b)}
    headline["delta_lo"] = [tested[k].low if k in tested else float("nan") for k in keys]
    headline["delta_hi"] = [tested[k].high if k in tested else float("nan") for k in keys]
    headline["verdict"] = [tested[k].verdict if k in tested else "" for k in keys]
    return headline


def _paired(folder_a: Path, folder_b: Path) -> list[Difference]:
    """Paired bootstrap of B - A when both reports scored the same images with the same labels; else nothing."""
    a = read_text_table(folder_a / "predictions.csv")
    b = read_text_table(folder_b / "predictions.csv")
    if "true_label" not in a or "true_label" not in b or set(a["path"]) != set(b["path"]) or len(a) != len(b):
        return []
    b = b.set_index("path").loc[a["path"]]
    if (b["true_label"].to_numpy() != a["true_label"].to_numpy()).any():
        return []
    classes = sorted(set(a["true_label"]) | set(a["predicted_label"]) | set(b["predicted_label"]))
    code = {c: i for i, c in enumerate(classes)}
    encode = lambda column: np.array([code[v] for v in column])  # noqa: E731
    return paired_difference(encode(a["true_label"]), encode(a["predicted_label"]), encode(b["predicted_label"]), len(classes))


MIN_F1_CHANGE = 0.02  # smaller per-class F1 moves are listed as unchanged: on small splits they are one image or two


def _changes(per_class: pd.DataFrame, positive: bool, *, name: Callable[[Any], str] = str) -> str:
    """'cat (+0.120), dog (+0.031)': the classes whose F1 moved that way, each name through `name` (escaped for Markdown)."""
    moved = per_class["f1_delta"] >= MIN_F1_CHANGE if positive else per_class["f1_delta"] <= -MIN_F1_CHANGE
    chosen = per_class[moved].sort_values("f1_delta", ascending=not positive)
    return ", ".join(f"{name(c)} ({d:+.3f})" for c, d in zip(chosen["class"], chosen["f1_delta"])) or "none"


def _confusion_cells(confusion: pd.DataFrame, *, grew: bool, limit: int = 5) -> str:
    """Off-diagonal cells whose share of the true class rose (grew) or fell (shrank), largest change first."""
    cells = confusion.stack().rename("change").reset_index()
    cells.columns = ["true", "predicted", "change"]
    off = cells[cells["true"] != cells["predicted"]]
    chosen = off[off["change"] > 0] if grew else off[off["change"] < 0]
    chosen = chosen.sort_values("change", ascending=not grew).head(limit)
    return markdown_table(chosen, names=["true", "predicted"], floatfmt="+.3f") if len(chosen) else "none"


def _markdown(folder_a: Path, folder_b: Path, headline: pd.DataFrame, per_class: pd.DataFrame, confusion: pd.DataFrame) -> str:
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
            f"## Fixed (F1 up by {MIN_F1_CHANGE} or more): {_changes(per_class, positive=True, name=escape_markdown)}",
            "",
            f"## Broke (F1 down by {MIN_F1_CHANGE} or more): {_changes(per_class, positive=False, name=escape_markdown)}",
            "",
            "_Per-class moves are listed by size, not tested against noise: trust them as far as the paired verdict above._",
            "",
            "## Confusions that grew most (B sends more of the true class there)",
            "",
            _confusion_cells(confusion, grew=True),
            "",
            "## Confusions that shrank most",
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
    path: Path, folder_a: Path, folder_b: Path, headline: pd.DataFrame, per_class: pd.DataFrame, confusion: pd.DataFrame
) -> None:
    """diff.html: diff.md's content on one self-contained page, the confusion change inline."""
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
                f"Fixed (F1 up by {MIN_F1_CHANGE} or more): {_changes(per_class, positive=True)}",
                f"Broke (F1 down by {MIN_F1_CHANGE} or more): {_changes(per_class, positive=False)}",
                "Per-class moves are listed by size, not tested against noise: trust them as far as the paired verdict above.",
            ],
        ),
        Section(
            "Confusion change",
            paragraphs=["Blue: B better (more right answers on the diagonal, fewer confusions off it); red: B worse."],
            figure=path.parent / "confusion_diff.png",
        ),
        Section(
            "Confusions that grew most (B sends more of the true class there)",
            paragraphs=[] if grew is not None else ["none"],
            table=grew,
        ),
        Section("Confusions that shrank most", paragraphs=[] if shrank is not None else ["none"], table=shrank),
        Section("Per class (worst F1 change first)", table=classes),
    ]
    write_page(path, title="Report diff", intro=[f"A: {folder_a}", f"B: {folder_b}"], sections=sections)


def diff_reports(*, run_a: str | Path, run_b: str | Path, out: str | Path) -> ReportDiff:
    """Per-class metric deltas (B - A), confusion difference and headline deltas, as CSV, PNG, Markdown and HTML."""
    out = check_destination(out, reads=[Path(run_a), Path(run_b)])
    folder_a, folder_b = _report_folder(Path(run_a)), _report_folder(Path(run_b))
    per_class = _per_class_diff(folder_a, folder_b)
    confusion = _confusion_diff(folder_a, folder_b)
    headline = _headline_diff(folder_a, folder_b)
    with replaced_folder(out, marker="diff.md") as staging:  # swapped in whole: never two diffs mixed
        write_table(per_class, staging / "per_class_diff.csv", float_format="%.6f")
        write_table(confusion, staging / "confusion_diff.csv", index=True, float_format="%.6f")
        write_table(headline, staging / "metrics_diff.csv", float_format="%.6f")
        title = "confusion change (B - A, row-normalised)"
        plot_confusion_difference(confusion, staging / "confusion_diff.png", title=title)
        write_text(staging / "diff.md", _markdown(folder_a, folder_b, headline, per_class, confusion))
        _write_html(staging / "diff.html", folder_a, folder_b, headline, per_class, confusion)
    return ReportDiff(folder=out, per_class=per_class, headline=headline)
