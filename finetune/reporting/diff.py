"""`finetune report diff RUN_A RUN_B`: what a change fixed and what it broke, per class and per confusion cell."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.errors import DataError, RunDirError
from finetune.reporting.plots import plot_confusion_difference

METRICS = ("precision", "recall", "f1")


@dataclass
class ReportDiff:
    folder: Path
    per_class: pd.DataFrame
    headline: pd.DataFrame


def _report_folder(path: Path) -> Path:
    for candidate in (path / "report", path):
        if (candidate / "per_class.csv").exists() and (candidate / "confusion_matrix.csv").exists():
            return candidate
    raise RunDirError(f"{path} holds no report (per_class.csv, confusion_matrix.csv); run 'finetune eval' or pass a run folder")


def _normalized(counts: pd.DataFrame) -> pd.DataFrame:
    return counts.div(counts.sum(axis=1).replace(0, 1), axis=0)


def diff_reports(*, run_a: str | Path, run_b: str | Path, out: str | Path) -> ReportDiff:
    """Per-class metric deltas (B - A), confusion difference and headline deltas, as CSV, PNG and Markdown."""
    folder_a, folder_b = _report_folder(Path(run_a)), _report_folder(Path(run_b))
    a = pd.read_csv(folder_a / "per_class.csv", dtype={"class": str})
    b = pd.read_csv(folder_b / "per_class.csv", dtype={"class": str})
    if set(a["class"]) != set(b["class"]):
        only = sorted(set(a["class"]) ^ set(b["class"]))
        raise DataError(f"the two reports have different classes (only in one: {only}); compare runs of the same dataset")
    merged = a.merge(b, on="class", suffixes=("_a", "_b"))
    for metric in METRICS:
        merged[f"{metric}_delta"] = merged[f"{metric}_b"] - merged[f"{metric}_a"]
    columns = ["class"] + [f"{m}_{s}" for m in METRICS for s in ("a", "b", "delta")] + ["support_a", "support_b"]
    per_class = merged[columns].sort_values("f1_delta").reset_index(drop=True)

    counts_a = pd.read_csv(folder_a / "confusion_matrix.csv", index_col=0, dtype={0: str})
    counts_b = pd.read_csv(folder_b / "confusion_matrix.csv", index_col=0, dtype={0: str})
    counts_a.index, counts_b.index = counts_a.index.astype(str), counts_b.index.astype(str)
    order = list(counts_a.index)
    confusion = _normalized(counts_b.loc[order, order]) - _normalized(counts_a.loc[order, order])

    metrics_a = json.loads((folder_a / "metrics.json").read_text())
    metrics_b = json.loads((folder_b / "metrics.json").read_text())
    keys = [k for k, v in metrics_a.items() if isinstance(v, float) and isinstance(metrics_b.get(k), float)]
    headline = pd.DataFrame({"metric": keys, "a": [metrics_a[k] for k in keys], "b": [metrics_b[k] for k in keys]})
    headline["delta"] = headline["b"] - headline["a"]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    per_class.to_csv(out / "per_class_diff.csv", index=False, float_format="%.6f")
    confusion.to_csv(out / "confusion_diff.csv", float_format="%.6f")
    headline.to_csv(out / "metrics_diff.csv", index=False, float_format="%.6f")
    plot_confusion_difference(confusion, out / "confusion_diff.png", title="confusion change (B - A, row-normalised)")
    cells = confusion.stack().rename("change").reset_index()
    cells.columns = ["true", "predicted", "change"]
    off = cells[cells["true"] != cells["predicted"]]
    fixed = per_class[per_class["f1_delta"] > 0].sort_values("f1_delta", ascending=False)
    broke = per_class[per_class["f1_delta"] < 0]
    lines = [
        "# Report diff", "", f"A: `{folder_a}`  ", f"B: `{folder_b}`", "",
        headline.to_markdown(index=False, floatfmt="+.4f"), "",
        f"## Fixed (F1 up): {', '.join(f'{c} ({d:+.3f})' for c, d in zip(fixed['class'], fixed['f1_delta'])) or 'none'}", "",
        f"## Broke (F1 down): {', '.join(f'{c} ({d:+.3f})' for c, d in zip(broke['class'], broke['f1_delta'])) or 'none'}", "",
        "## Confusions that grew most", "",
        off.sort_values("change", ascending=False).head(5).to_markdown(index=False, floatfmt="+.3f"), "",
        "## Confusions that shrank most", "",
        off.sort_values("change").head(5).to_markdown(index=False, floatfmt="+.3f"), "",
        "## Per class", "", per_class.to_markdown(index=False, floatfmt=".3f"), "",
    ]
    (out / "diff.md").write_text("\n".join(lines), encoding="utf-8")
    return ReportDiff(folder=out, per_class=per_class, headline=headline)
