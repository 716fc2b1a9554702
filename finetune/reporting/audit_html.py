"""audit.html: one self-contained page (pictures inline) with the suspects of `finetune audit`, most suspect first."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from finetune.data.decode import printable
from finetune.files import write_text
from finetune.reporting.html import escaped_table, name_parts, thumbnail


@dataclass
class AuditPage:
    summary: dict[str, Any]
    issues: pd.DataFrame
    overlapping: pd.DataFrame
    conflicts: pd.DataFrame
    outliers: pd.DataFrame
    gallery: int = 48  # suspects shown as pictures (all are in label_issues.csv)
    atypical: int = 16  # outliers shown


def _suspects(issues: pd.DataFrame, limit: int) -> list[dict[str, Any]]:
    return [
        {
            "image": thumbnail(row.path),
            "path": printable(row.path),
            "name_parts": name_parts(row.path),
            "given": row.given_label,
            "suggested": row.suggested_label,
            "given_prob": f"{row.given_prob:.0%}",
            "suggested_prob": f"{row.suggested_prob:.0%}",
            "quality": f"{row.label_quality:.3f}",
            "reason": row.reason,
        }
        for row in issues.head(limit).itertuples()
    ]


def _pairs(conflicts: pd.DataFrame, limit: int = 24) -> list[dict[str, Any]]:
    return [
        {
            "a": thumbnail(row.path_a),
            "b": thumbnail(row.path_b),
            "a_name": printable(Path(row.path_a).name),
            "b_name": printable(Path(row.path_b).name),
            "label_a": row.label_a,
            "label_b": row.label_b,
            "kind": row.kind,
        }
        for row in conflicts.head(limit).itertuples()
    ]


def _outliers(outliers: pd.DataFrame, limit: int) -> list[dict[str, Any]]:
    return [
        {
            "image": thumbnail(row.path),
            "name_parts": name_parts(row.path),
            "label": row.label,
            "score": f"{row.outlier_score:.3f}",
        }
        for row in outliers.head(limit).itertuples()
    ]


WEAK_MODEL_ACCURACY = 0.85  # below this out-of-fold accuracy, the page warns that suspects are mostly model mistakes


def render_audit(page: AuditPage, path: Path) -> None:
    env = Environment(loader=PackageLoader("finetune.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    overlapping = page.overlapping.head(20)
    html = env.get_template("audit.html.j2").render(
        written=time.strftime("%Y-%m-%d %H:%M"),
        s=page.summary,
        weak_below=WEAK_MODEL_ACCURACY,
        suspects=_suspects(page.issues, page.gallery),
        more=max(0, len(page.issues) - page.gallery),
        pairs=_pairs(page.conflicts),
        outliers=_outliers(page.outliers, page.atypical),
        overlapping=escaped_table(overlapping, {"joint_probability": "{:.4f}"}).hide(axis="index").to_html()
        if len(overlapping)
        else None,
    )
    write_text(path, html)
