"""`finetune audit`: which labels look wrong, which classes overlap, which pictures are duplicates under two labels
or unlike the rest, from out-of-fold predictions (a model never judges an image it trained on)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.config.loading import load_recipe
from finetune.config.schema import Recipe
from finetune.data.doctor import examine_all
from finetune.data.duplicates import duplicate_pairs, pair_count
from finetune.data.facts import FactsCache
from finetune.evaluation.audit import audit_labels, audit_multilabel, outlier_scores, require_cleanlab
from finetune.files import published_together, write_table, write_text
from finetune.inference.predictions import label_sets
from finetune.reporting.audit_html import WEAK_MODEL_ACCURACY, AuditPage, render_audit
from finetune.reporting.page import Section, write_page
from finetune.run_dir import RunDir, check_destination, removed_if_unstarted
from finetune.runs.cv import CVResult, cross_validate
from finetune.runs.prepare import prepare_model, refuse_changed_recipe
from finetune.training.feature_cache import recipe_features

log = logging.getLogger(__name__)
AUDIT_FILES = (
    "label_issues.csv",
    "label_quality.csv",
    "overlapping_classes.csv",
    "class_quality.csv",  # several labels per image: each class's issues and quality instead of overlapping pairs
    "conflicting_duplicates.csv",
    "outliers.csv",
    "audit.json",
    "audit.html",
)


@dataclass
class AuditResult:
    folder: Path
    issues: pd.DataFrame  # the suspects, most suspect first (label_issues.csv)
    quality: pd.DataFrame  # every image, most suspect first (label_quality.csv)
    overlapping: pd.DataFrame
    conflicts: pd.DataFrame  # exact or near duplicates with different labels
    outliers: pd.DataFrame  # every image, least typical first
    health: float
    cv: CVResult
    seconds: float


def audit(
    *,
    data: str | Path,
    recipe: Recipe | dict[str, Any] | str | Path,
    out: str | Path,
    folds: int = 5,
    overrides: Sequence[str] = (),
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> AuditResult:
    """K-fold out-of-fold probabilities of `recipe` on `data` (OUT/cv/), then the label audit into OUT.

    An interrupted audit continues its folds when called again with the same recipe and data.
    """
    started = time.perf_counter()
    require_cleanlab()
    out = check_destination(out, holds_runs=True)
    cv_dir = RunDir(out / "cv")
    resume = cv_dir.folds.exists()
    if resume:
        refuse_changed_recipe(load_recipe(cv_dir.recipe), recipe, overrides, data, cv_dir)
    with removed_if_unstarted(RunDir(out), marker=cv_dir.recipe):  # a failed start leaves no folder behind
        cv = cross_validate(
            recipe=recipe,
            data=data,
            out=cv_dir.root,
            folds=folds,
            overrides=overrides,
            resume=resume,
            progress=progress,
            cache_dir=cache_dir,
        )
    resolved = load_recipe(cv_dir.recipe)
    # one scale for every fold: each fold's temperature was fitted on its own held-out images, suspects included
    multilabel = cv.oof.task.name == "multilabel"
    audited = audit_multilabel if multilabel else audit_labels
    labels = audited(cv.oof.with_temperature(1.0), cv.class_names)
    conflicts = _conflicts(cv)
    outliers = _outliers(cv, resolved, progress=progress, cache_dir=cache_dir)
    quality = _with_reasons(labels.table, conflicts)
    issues = quality[quality["reason"] != ""].reset_index(drop=True)
    summary = _summary(cv, issues, conflicts, labels.health, folds=len(cv.summary) - 2)  # one row per fold, then mean, std
    page = AuditPage(summary=summary, issues=issues, overlapping=labels.overlapping, conflicts=conflicts, outliers=outliers)
    _publish(out, page, quality, multilabel=multilabel)
    log.info(
        "audit: %d suspect label(s) of %d images, %d conflicting duplicate pair(s) -> %s",
        len(issues),
        len(quality),
        pair_count(conflicts),
        out / "audit.html",
    )
    return AuditResult(
        out, issues, quality, labels.overlapping, conflicts, outliers, labels.health, cv, time.perf_counter() - started
    )


def _conflicts(cv: CVResult) -> pd.DataFrame:
    """Exact and near duplicate pairs whose labels differ, among the audited images."""
    samples = pd.DataFrame({"path": cv.oof.paths, "label": _given_labels(cv), "split": ""})
    missing = [p for p in samples["path"] if p not in cv.facts]
    facts = dict(cv.facts) | dict(zip(missing, examine_all(missing, progress=False, cache=FactsCache.default())))
    pairs = duplicate_pairs(samples, [facts[p] for p in samples["path"]], across="label")  # capped per group
    return pairs[["path_a", "label_a", "path_b", "label_b", "kind", "distance", "group", "group_pairs"]]


def _outliers(cv: CVResult, recipe: Recipe, *, progress: bool, cache_dir: str | Path | None) -> pd.DataFrame:
    """cleanlab's outlier score from the recipe's starting backbone (the pretrained one; the feature cache's entries)."""
    model = prepare_model(recipe, num_classes=len(cv.class_names))
    root = Path(cache_dir) if cache_dir is not None else None
    features = recipe_features(model.bundle, cv.oof.paths, model.eval_pipeline, recipe, progress=progress, cache_dir=root)
    frame = pd.DataFrame({"path": cv.oof.paths, "label": _given_labels(cv), "outlier_score": outlier_scores(features)})
    return frame.sort_values("outlier_score", kind="stable").reset_index(drop=True)


def _given_labels(cv: CVResult) -> list[str]:
    """Each audited image's label as given: its class, or with several labels per image its names joined by |."""
    if cv.oof.task.name == "multilabel":
        return label_sets(np.asarray(cv.oof.targets) > 0.5, cv.class_names)
    return list(np.asarray(cv.class_names, dtype=object)[cv.oof.targets])


def _confident_learning(row: Any) -> str:
    """Confident learning's verdict on one flagged image, in words."""
    if hasattr(row, "given_labels"):
        return (
            f"confident learning: out-of-fold models suggest '{row.suggested_labels}' for '{row.given_labels}' "
            f"(looks missing: {row.looks_missing or '-'}; looks wrong: {row.looks_wrong or '-'})"
        )
    return (
        f"confident learning: out-of-fold models give '{row.given_label}' {row.given_prob:.0%}, "
        f"'{row.suggested_label}' {row.suggested_prob:.0%}"
    )


def _publish(out: Path, page: AuditPage, quality: pd.DataFrame, *, multilabel: bool) -> None:
    """Every audit file, written aside and renamed in together: a kill leaves the previous pages whole, never a mix."""
    with published_together(out, AUDIT_FILES) as staging:
        write_table(page.issues, staging / "label_issues.csv", float_format="%.6f")
        write_table(quality, staging / "label_quality.csv", float_format="%.6f")
        classes = "class_quality.csv" if multilabel else "overlapping_classes.csv"
        write_table(page.overlapping, staging / classes, float_format="%.6f")
        write_table(page.conflicts, staging / "conflicting_duplicates.csv")
        write_table(page.outliers, staging / "outliers.csv", float_format="%.6f")
        write_text(staging / "audit.json", json.dumps(page.summary, indent=1))
        _page(staging / "audit.html", multilabel, page)


def _page(path: Path, multilabel: bool, page: AuditPage) -> None:
    """audit.html: the one-label page, or the page of several labels per image."""
    if multilabel:
        _multilabel_page(path, page.summary, page.issues, page.overlapping, page.conflicts)
    else:
        render_audit(page, path)


def _multilabel_page(
    path: Path, summary: dict[str, Any], issues: pd.DataFrame, classes: pd.DataFrame, conflicts: pd.DataFrame
) -> None:
    """audit.html for several labels per image: the figures, the suspects with what looks missing or wrong, each
    class's issues and quality, the duplicates under two label sets."""
    shown = ["path", "given_labels", "suggested_labels", "looks_missing", "looks_wrong", "label_quality"]
    figures = pd.DataFrame(
        {
            "figure": ["images", "folds", "out-of-fold mean average precision", "label issues", "label health"],
            "value": [
                summary["images"],
                summary["folds"],
                f"{summary['oof_mean_average_precision']:.3f}",
                summary["label_issues"],
                f"{summary['label_health']:.3f}",
            ],
        }
    )
    sections = [
        Section("Out-of-fold figures", table=figures),
        Section(
            "Suspect images, most suspect first", paragraphs=["Also in label_issues.csv."], table=issues[shown].head(200).round(4)
        ),
        Section("Per class (cleanlab's rank_classes_by_multilabel_quality)", table=classes.round(4)),
        Section("Duplicates under two label sets", table=conflicts.head(100)),
    ]
    intro = ["cleanlab's multi-label confident learning on out-of-fold probabilities: which labels look missing or wrong."]
    write_page(path, title="Label audit (several labels per image)", intro=intro, sections=sections)


def _with_reasons(table: pd.DataFrame, conflicts: pd.DataFrame) -> pd.DataFrame:
    """Every image with a `reason` ('' when nothing is suspect): confident learning's verdict and duplicate conflicts."""
    reasons: dict[str, list[str]] = {p: [] for p in table["path"]}
    for row in table.itertuples():
        if row.label_issue:
            reasons[row.path].append(_confident_learning(row))
    for row in conflicts.itertuples():
        reasons[row.path_a].append(f"{row.kind} of {Path(row.path_b).name} labelled '{row.label_b}'")
        reasons[row.path_b].append(f"{row.kind} of {Path(row.path_a).name} labelled '{row.label_a}'")
    result = table.assign(reason=["; ".join(reasons[p]) for p in table["path"]])
    suspect = result["reason"] != ""
    return pd.concat([result[suspect], result[~suspect]]).reset_index(drop=True)


def _summary(cv: CVResult, issues: pd.DataFrame, conflicts: pd.DataFrame, health: float, *, folds: int) -> dict[str, Any]:
    metrics = cv.report.metrics
    first = "mean_average_precision" if metrics.get("task") == "multilabel" else "accuracy"
    if metrics[first] < WEAK_MODEL_ACCURACY:
        log.warning(
            "the out-of-fold models reach only %.1f%% %s: many suspects will be their mistakes, not wrong labels; "
            "give the recipe pretrained weights or train longer before trusting the list",
            100 * metrics[first],
            first.replace("_", " "),
        )
    return {
        "images": len(cv.oof.paths),
        "classes": cv.class_names,
        "folds": folds,
        f"oof_{first}": metrics[first],
        "oof_macro_f1": metrics["macro_f1"],
        "label_issues": int(issues["label_issue"].sum()),
        "suspects": len(issues),
        "conflicting_duplicate_pairs": pair_count(conflicts),
        "label_health": health,
        "cv_folder": str(cv.run_dir),
    }
