"""Data quality: decode every file, find unreadable and odd images, duplicates and split leakage (`finetune check`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.bars import progress as progress_bar
from finetune.config.catalog import EXTENSION_FORMATS
from finetune.data.duplicates import duplicate_pairs, find_duplicate_groups, list_pairs, pair_count
from finetune.data.facts import FLAT_LOOK, FactsCache, ImageFacts
from finetune.data.label_tools import is_tool_export
from finetune.data.parallel import examine_many
from finetune.data.scan import class_folders, read_tool_manifest, scan_image_folder, split_folders, split_labels
from finetune.errors import DataError

log = logging.getLogger(__name__)

UNUSUAL_MODES = {
    "CMYK": "CMYK",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I": "32-bit integer",
    "F": "float",
    "P": "palette",
    "PA": "palette+alpha",
    "RGBA": "alpha",
    "LA": "grey+alpha",
    "L": "greyscale",
    "1": "1-bit",
}
FINDING_COLUMNS = ["path", "label", "split", "severity", "kind", "detail"]


def _rare_placeholders(facts: list[ImageFacts]) -> list[ImageFacts]:
    """Keep look-alike placeholders only where they are rare: a dataset of light, flat pictures (document scans,
    line drawings) looks like that by nature, and flagging all of it would bury the real findings."""
    look = [i for i, f in enumerate(facts) if f.placeholder and f.placeholder.startswith(FLAT_LOOK)]
    if len(look) <= max(3, len(facts) // 100):
        return facts
    return [replace(f, placeholder=None) if i in set(look) else f for i, f in enumerate(facts)]


def examine_all(paths: Sequence[str], *, progress: bool = True, cache: FactsCache | None = None) -> list[ImageFacts]:
    """`examine_image` for every path, placeholders judged against the whole set."""
    looked = list(
        progress_bar(examine_many(paths, cache=cache), total=len(paths), desc="check images", disable=not progress, leave=False)
    )
    return _rare_placeholders(looked)


def _ignored_files(root: Path, extensions: Sequence[str]) -> list[dict[str, Any]]:
    """Hidden and non-image files, which are skipped, and symlinks that point nowhere."""
    rows = []
    for path in sorted(root.rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if path.is_symlink() and not path.exists():
            rows.append(
                _finding(str(path), "", "", "warning", "dangling symlink", f"points to {os.readlink(path)}, which does not exist")
            )
        elif not path.is_file():
            continue
        elif hidden:
            rows.append(_finding(str(path), "", "", "info", "ignored hidden file", ""))
        elif path.suffix.lower() not in extensions:
            rows.append(_finding(str(path), "", "", "info", "ignored non-image file", f"extension '{path.suffix}'"))
    return rows


def _empty_class_folders(root: Path | None, samples: pd.DataFrame) -> list[str]:
    if root is None:
        return []
    splits = split_folders(root)
    bases = list(splits) if splits is not None else [root]
    found = set(samples["label"])
    return sorted({d.name for base in bases for d in class_folders(base) if d.name not in found})


def _facts_findings(path: str, fact: ImageFacts, *, tiny: int, max_aspect: float) -> list[tuple[str, str, str]]:
    """(severity, kind, detail) for one readable file."""
    found = []
    expected = EXTENSION_FORMATS.get(Path(path).suffix.lower())
    if expected and fact.format and fact.format != expected:
        found.append(("warning", "extension mismatch", f"named {Path(path).suffix} but holds {fact.format}"))
    if fact.mode in UNUSUAL_MODES:
        found.append(("info", "converted mode", f"{UNUSUAL_MODES[fact.mode]} ({fact.mode}) will be converted to RGB"))
    if fact.exif_rotation != 1:
        found.append(("info", "EXIF rotation", f"orientation {fact.exif_rotation} is applied"))
    width, height = fact.size
    if min(width, height) < tiny:
        found.append(("warning", "tiny image", f"{width}x{height} px"))
    if max(width, height) > max_aspect * max(min(width, height), 1):
        found.append(("warning", "extreme aspect", f"{width}x{height} px"))
    if fact.placeholder:
        found.append(("warning", "placeholder image", f"{fact.placeholder}; remove it or replace it with the real picture"))
    return found


def file_findings(
    samples: pd.DataFrame, facts: Sequence[ImageFacts], *, tiny: int = 32, max_aspect: float = 5.0
) -> list[dict[str, Any]]:
    """One row per thing worth saying about a file."""
    rows = []
    for (path, label, split), fact in zip(samples[["path", "label", "split"]].itertuples(index=False), facts):
        if fact.problem is not None:
            rows.append(_finding(path, label, split, "error", fact.problem, fact.detail))
            continue
        rows += [_finding(path, label, split, *found) for found in _facts_findings(path, fact, tiny=tiny, max_aspect=max_aspect)]
    return rows


@dataclass
class CheckResult:
    findings: pd.DataFrame
    class_counts: pd.DataFrame
    duplicates: pd.DataFrame
    summary: dict[str, Any]

    @property
    def trainable(self) -> bool:
        return bool(self.summary["trainable"])

    def to_dict(self) -> dict[str, Any]:
        """Everything, as plain types (what `finetune check --json` writes)."""
        return {
            "summary": self.summary,
            "class_counts": self.class_counts.to_dict(orient="records"),
            "findings": self.findings.to_dict(orient="records"),
            "duplicates": self.duplicates.to_dict(orient="records"),
        }


def _finding(path: str, label: str, split: str, severity: str, kind: str, detail: str) -> dict[str, Any]:
    return {"path": path, "label": label, "split": split, "severity": severity, "kind": kind, "detail": detail}


def _class_findings(
    root: Path | None, samples: pd.DataFrame, counts: pd.DataFrame, unreadable_classes: list[str]
) -> list[dict[str, Any]]:
    """Empty class folders, classes of one image, and classes whose every image is unreadable."""
    rows = [
        _finding(name, name, "", "warning", "empty class", "no readable images; ignored")
        for name in _empty_class_folders(root, samples)
    ]
    rows += [
        _finding(label, label, "", "warning", "single-image class", "too few to split or learn")
        for label, total in counts["total"].items()
        if total == 1
    ]
    rows += [
        _finding(label, label, "", "error", "class without readable images", "training would fail")
        for label in unreadable_classes
    ]
    return rows


def _duplicate_findings(duplicates: pd.DataFrame) -> list[dict[str, Any]]:
    """Duplicates within a split (info), across splits (leakage) and, worst, under two different classes; and one line
    for each group too large to list whole (thousands of blank frames are one group, not millions of pairs)."""
    rows = []
    for dup in duplicates.itertuples():
        leak, conflict = bool(dup.crosses_split), dup.label_a != dup.label_b
        kind = f"{dup.kind}{' across splits (leakage)' if leak else ''}"
        detail = f"{dup.path_b} ({dup.split_b or 'unsplit'}, distance {dup.distance})"
        if conflict:
            kind = f"{dup.kind} in two classes"
            detail = f"{dup.path_b} is labelled '{dup.label_b}': a placeholder picture, or one of the two labels is wrong"
        rows.append(_finding(dup.path_a, dup.label_a, dup.split_a, "warning" if leak or conflict else "info", kind, detail))
    if not len(duplicates):
        return rows
    listed = duplicates.groupby("group").agg(first=("path_a", "first"), rows=("path_a", "size"), pairs=("group_pairs", "first"))
    for group in listed[listed["pairs"] > listed["rows"]].itertuples():
        mine = duplicates[duplicates["group"] == group.Index]
        if (mine["distance"] == 0).all():  # one perceptual hash: k images hold k(k-1)/2 pairs
            images = f"{round((1 + (1 + 8 * group.pairs) ** 0.5) / 2)} images with one perceptual hash"
        else:
            images = f"{mine[['path_a', 'path_b']].stack().nunique()}+ look-alike images"
        detail = (
            f"{images}: {group.pairs} duplicate pairs, {group.rows} listed (--json); blank or placeholder frames? "
            "remove the copies or keep one"
        )
        rows.append(_finding(group.first, "", "", "warning", "large duplicate group", detail))
    return rows


def _blockers(counts: pd.DataFrame, unreadable_classes: list[str]) -> list[str]:
    """Why training would fail on this folder (empty: it would not)."""
    classes = list(counts.index)
    blockers = [f"class '{label}' has no readable image" for label in unreadable_classes]
    if len(classes) < 2:
        shown = f" ({classes[0]})" if classes else ""
        blockers.insert(0, f"{len(classes)} class{shown} with readable images; training needs at least 2")
    return blockers


def check_dataset(
    root: str | Path, *, extensions: Sequence[str], progress: bool = True, cache: FactsCache | None = None
) -> CheckResult:
    """The dataset doctor: everything `finetune check` reports, as tables plus a summary."""
    root = Path(root)
    folder = not is_tool_export(root)  # else a Label Studio export or a FiftyOne folder: no class folders to look at
    samples = scan_image_folder(root, extensions=extensions) if folder else read_tool_manifest(root)
    facts = examine_all(list(samples["path"]), progress=progress, cache=cache)
    readable = samples[[f.problem is None for f in facts]]
    counts = readable.groupby(["label", "split"]).size().unstack(fill_value=0)
    counts["total"] = counts.sum(axis=1)
    unreadable_classes = sorted(set(samples["label"]) - set(readable["label"]))
    ordered = samples.reset_index(drop=True)
    groups = find_duplicate_groups(facts)
    duplicates = list_pairs(ordered, facts, groups)
    rows = file_findings(samples, facts) + (_ignored_files(root, extensions) if folder else [])
    rows += _class_findings(root if folder else None, samples, counts, unreadable_classes) + _duplicate_findings(duplicates)
    blockers = _blockers(counts, unreadable_classes)
    if len(counts) < 2:
        rows.append(_finding(str(root), "", "", "error", "too few classes", blockers[0]))
    findings = pd.DataFrame(rows, columns=FINDING_COLUMNS).fillna("")
    totals = counts["total"] if len(counts) else pd.Series(dtype=int)
    summary = {
        "root": str(root),
        "images": int(len(samples)),
        "readable": int(len(readable)),
        "classes": int(len(totals)),
        "errors": int((findings["severity"] == "error").sum()),
        "warnings": int((findings["severity"] == "warning").sum()),
        "imbalance_ratio": float(totals.max() / totals.min()) if len(totals) else None,
        "leaking_pairs": pair_count(list_pairs(ordered, facts, groups, across="split")),
        "trainable": not blockers,
        "blockers": blockers,
    }
    return CheckResult(findings=findings, class_counts=counts.reset_index(), duplicates=duplicates, summary=summary)


def format_check(result: CheckResult, *, limit: int = 40) -> str:
    """The terminal view: class counts, findings by kind, then the first `limit` findings."""
    s = result.summary
    lines = [
        f"{s['root']}: {s['images']} images ({s['readable']} readable), {s['classes']} classes, imbalance ratio "
        f"{s['imbalance_ratio']:.2f}"
        if s["imbalance_ratio"]
        else f"{s['root']}: no readable images",
        "",
        result.class_counts.to_string(index=False),
        "",
    ]
    if len(result.findings):
        by_kind = result.findings.groupby(["severity", "kind"]).size().rename("files").reset_index()
        lines += [by_kind.to_string(index=False), ""]
        shown = result.findings.sort_values("severity").head(limit)
        lines += [f"{r.severity:<7} {r.kind:<32} {r.path}  {r.detail}" for r in shown.itertuples()]
        if len(result.findings) > limit:
            lines.append(f"... {len(result.findings) - limit} more (use --json for all)")
    verdict = "trainable" if s["trainable"] else "NOT trainable: " + "; ".join(s["blockers"])
    lines += [
        "",
        f"{s['errors']} error(s), {s['warnings']} warning(s), {s['leaking_pairs']} duplicate pair(s) across splits: {verdict}",
    ]
    return "\n".join(lines)


@dataclass
class Screened:
    """Samples whose images decode, the ones skipped (with reasons) and duplicate pairs across splits."""

    samples: pd.DataFrame
    skipped: pd.DataFrame
    facts: dict[str, ImageFacts]


@dataclass(frozen=True)
class Advice:
    """What screening tells the user to do, by command: training's fix (data.exclude) means nothing to predict."""

    skipped: str  # after "skipping N unreadable image(s), e.g. PATH (why)"; "" for nothing
    placeholders: str  # after "... look like placeholder pictures rather than photos, e.g. PATH (why)"


TRAINING_ADVICE = Advice(
    skipped="", placeholders="they are used as they are: see 'finetune check', then remove them or list them in data.exclude"
)
PREDICTION_ADVICE = Advice(
    skipped="they get no prediction: replace the files, or leave them out of the input",
    placeholders="they are classified as they are: read their predictions with care, or leave them out",
)
EVALUATION_ADVICE = Advice(
    skipped="they are left out of the scores: replace the files, or remove them from the evaluated folder",
    placeholders="they are scored as they are: remove them from the evaluated folder if they are not real pictures",
)


def _names(labels: pd.Series, multilabel: bool) -> set[str]:
    """The class names a label column holds (every name of every 'cat|dog' cell with several labels per image)."""
    return {n for cell in labels for n in split_labels(str(cell))} if multilabel else {str(x) for x in labels}


def screen_samples(
    samples: pd.DataFrame,
    *,
    policy: str,
    progress: bool = True,
    known: Mapping[str, ImageFacts] | None = None,
    cache: FactsCache | None = None,
    advice: Advice = TRAINING_ADVICE,
    multilabel: bool = False,
) -> Screened:
    """Decode every image once: skip (and list) or refuse the unreadable ones; `advice` says what the user can do
    (training's by default). With `multilabel`, a `label` cell holds names joined by | (each name is a class).

    `known` holds facts already gathered for some paths (cross-validation folds share one screening pass)."""
    known = known or {}
    fresh = [p for p in samples["path"] if p not in known]
    examined = dict(zip(fresh, examine_all(fresh, progress=progress, cache=cache)))
    facts = [known[p] if p in known else examined[p] for p in samples["path"]]
    bad = np.array([f.problem is not None for f in facts], dtype=bool)
    skipped = samples[bad].copy()
    skipped["reason"] = [f"{f.problem}: {f.detail}" if f.detail else f.problem for f in facts if f.problem is not None]
    if len(skipped) and policy == "fail":
        listing = "; ".join(f"{p} ({r})" for p, r in zip(skipped["path"], skipped["reason"]))
        raise DataError(f"{len(skipped)} unreadable image(s) and data.bad_images is 'fail': {listing}")
    kept = samples[~bad]
    lost = sorted(_names(samples["label"], multilabel) - _names(kept["label"], multilabel) - {""})
    if lost:
        raise DataError(
            f"class '{lost[0]}' has no readable images ({int((samples['label'] == lost[0]).sum())} skipped); "
            "replace the files or remove the class folder"
        )
    if len(skipped):
        log.warning(
            "skipping %d unreadable image(s), e.g. %s (%s)%s",
            len(skipped),
            skipped["path"].iloc[0],
            skipped["reason"].iloc[0],
            f"; {advice.skipped}" if advice.skipped else "",
        )
    _warn_placeholders({p: f for p, f in zip(samples["path"], facts) if p not in known}, advice)  # `known`: warned already
    return Screened(samples=kept, skipped=skipped.reset_index(drop=True), facts=dict(zip(samples["path"], facts)))


def _warn_placeholders(facts: Mapping[str, ImageFacts], advice: Advice) -> None:
    looks = [(p, f.placeholder) for p, f in facts.items() if f.problem is None and f.placeholder]
    if looks:
        log.warning(
            "%d image(s) look like placeholder pictures rather than photos, e.g. %s (%s); %s",
            len(looks),
            *looks[0],
            advice.placeholders,
        )


def split_leakage(samples: pd.DataFrame, facts: dict[str, ImageFacts]) -> pd.DataFrame:
    """Exact and near duplicate pairs whose two images sit in different splits, at most `LISTED_PER_GROUP` per group of
    duplicates (`pair_count` says how many there are in all)."""
    ordered = samples.reset_index(drop=True)
    return duplicate_pairs(ordered, [facts[p] for p in ordered["path"]], across="split")
