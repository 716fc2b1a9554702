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
from finetune.evaluation.audit import audit_labels, outlier_scores, require_cleanlab
from finetune.files import published_together, write_table, write_text
from finetune.reporting.audit_html import WEAK_MODEL_ACCURACY, AuditPage, render_audit
from finetune.run_dir import RunDir, check_destination, removed_if_unstarted
from finetune.runs.cv import CVResult, cross_validate
from finetune.runs.prepare import prepare_model, refuse_changed_recipe
from finetune.training.feature_cache import recipe_features

log = logging.getLogger(__name__)
AUDIT_FILES = (
    "label_issues.csv",
    "label_quality.csv",
    "overlapping_classes.csv",
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
    labels = audit_labels(cv.oof.with_temperature(1.0), cv.class_names)
    conflicts = _conflicts(cv)
    outliers = _outliers(cv, resolved, progress=progress, cache_dir=cache_dir)
    quality = _with_reasons(labels.table, conflicts)
    issues = quality[quality["reason"] != ""].reset_index(drop=True)
    summary = _summary(cv, issues, conflicts, labels.health, folds=len(cv.summary) - 2)  # one row per fold, then mean, std
    page = AuditPage(summary=summary, issues=issues, overlapping=labels.overlapping, conflicts=conflicts, outliers=outliers)
    with published_together(out, AUDIT_FILES) as staging:  # a kill leaves the previous pages whole, never a mix
        write_table(issues, staging / "label_issues.csv", float_format="%.6f")
        write_table(quality, staging / "label_quality.csv", float_format="%.6f")
        write_table(labels.overlapping, staging / "overlapping_classes.csv", float_format="%.6f")
        write_table(conflicts, staging / "conflicting_duplicates.csv")
        write_table(outliers, staging / "outliers.csv", float_format="%.6f")
        write_text(staging / "audit.json", json.dumps(summary, indent=1))
        render_audit(page, staging / "audit.html")
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
    names = np.asarray(cv.class_names, dtype=object)
    samples = pd.DataFrame({"path": cv.oof.paths, "label": names[cv.oof.targets], "split": ""})
    missing = [p for p in samples["path"] if p not in cv.facts]
    facts = dict(cv.facts) | dict(zip(missing, examine_all(missing, progress=False, cache=FactsCache.default())))
    pairs = duplicate_pairs(samples, [facts[p] for p in samples["path"]], across="label")  # capped per group
    return pairs[["path_a", "label_a", "path_b", "label_b", "kind", "distance", "group", "group_pairs"]]


def _outliers(cv: CVResult, recipe: Recipe, *, progress: bool, cache_dir: str | Path | None) -> pd.DataFrame:
    """cleanlab's outlier score from the recipe's starting backbone (the pretrained one; the feature cache's entries)."""
    model = prepare_model(recipe, num_classes=len(cv.class_names))
    root = Path(cache_dir) if cache_dir is not None else None
    features = recipe_features(model.bundle, cv.oof.paths, model.eval_pipeline, recipe, progress=progress, cache_dir=root)
    names = np.asarray(cv.class_names, dtype=object)
    frame = pd.DataFrame({"path": cv.oof.paths, "label": names[cv.oof.targets], "outlier_score": outlier_scores(features)})
    return frame.sort_values("outlier_score", kind="stable").reset_index(drop=True)


def _with_reasons(table: pd.DataFrame, conflicts: pd.DataFrame) -> pd.DataFrame:
    """Every image with a `reason` ('' when nothing is suspect): confident learning's verdict and duplicate conflicts."""
    reasons: dict[str, list[str]] = {p: [] for p in table["path"]}
    for row in table.itertuples():
        if row.label_issue:
            reasons[row.path].append(
                f"confident learning: out-of-fold models give '{row.given_label}' {row.given_prob:.0%}, "
                f"'{row.suggested_label}' {row.suggested_prob:.0%}"
            )
    for row in conflicts.itertuples():
        reasons[row.path_a].append(f"{row.kind} of {Path(row.path_b).name} labelled '{row.label_b}'")
        reasons[row.path_b].append(f"{row.kind} of {Path(row.path_a).name} labelled '{row.label_a}'")
    result = table.assign(reason=["; ".join(reasons[p]) for p in table["path"]])
    suspect = result["reason"] != ""
    return pd.concat([result[suspect], result[~suspect]]).reset_index(drop=True)


def _summary(cv: CVResult, issues: pd.DataFrame, conflicts: pd.DataFrame, health: float, *, folds: int) -> dict[str, Any]:
    metrics = cv.report.metrics
    if metrics["accuracy"] < WEAK_MODEL_ACCURACY:
        log.warning(
            "the out-of-fold models reach only %.1f%% accuracy: many suspects will be their mistakes, not wrong labels; "
            "give the recipe pretrained weights or train longer before trusting the list",
            100 * metrics["accuracy"],
        )
    return {
        "images": len(cv.oof.paths),
        "classes": cv.class_names,
        "folds": folds,
        "oof_accuracy": metrics["accuracy"],
        "oof_macro_f1": metrics["macro_f1"],
        "label_issues": int(issues["label_issue"].sum()),
        "suspects": len(issues),
        "conflicting_duplicate_pairs": pair_count(conflicts),
        "label_health": health,
        "cv_folder": str(cv.run_dir),
    }
