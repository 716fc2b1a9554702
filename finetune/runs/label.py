"""`finetune label`: a trained run reads a folder of unlabelled images and says which labels it can be trusted with
(pseudo-labels, at a precision chosen on its validation split) and which images a person should label next."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune.data.doctor import duplicate_pairs, examine_all
from finetune.data.facts import FactsCache
from finetune.data.scan import read_path_list
from finetune.data.transforms import build_eval_pipeline
from finetune.errors import UsageError
from finetune.evaluation.labeling import (
    SHORTLIST,
    PseudoLabelRule,
    best_lower_bound,
    choose_queue,
    images_to_vouch,
    margins,
    precision_rule,
)
from finetune.files import published_together, read_text_table, write_table, write_text
from finetune.inference.checkpoint import TrainedModel
from finetune.inference.predictions import Predictions
from finetune.inference.predictor import Predictor, calibrated_validation
from finetune.reporting.fiftyone_format import write_fiftyone_dataset
from finetune.reporting.label_html import left_out_gallery, pseudo_label_galleries, queue_gallery, render_label_page
from finetune.reporting.label_studio import label_studio_tasks
from finetune.reporting.markdown import escape_markdown
from finetune.run_dir import check_destination
from finetune.training.feature_cache import recipe_features

log = logging.getLogger(__name__)
LABEL_FILES = (
    "predictions.csv",
    "pseudo_labels.csv",
    "to_label.csv",
    "left_out.csv",
    "summary.json",
    "summary.md",
    "label.html",
    "label_studio_tasks.json",
    "fiftyone",
)
QUEUE_COLUMNS = ["path", "suggested_label", "score", "reason"]
DUPLICATE_DISTANCE = 4  # perceptual-hash bits, as `finetune check` counts near duplicates


@dataclass
class LabelResult:
    folder: Path
    predictions: pd.DataFrame  # every unlabelled image (predictions.csv)
    pseudo_labels: pd.DataFrame  # path, label, confidence: the trusted answers, lowest confidence first
    queue: pd.DataFrame  # path, suggested_label, score, reason: label these next, in this order
    left_out: pd.DataFrame  # near duplicates of labelled images, kept out of the queue, with the reason
    rule: PseudoLabelRule
    summary: dict[str, Any]


def label(
    *,
    run: str | Path,
    unlabeled: str | Path,
    out: str | Path,
    target_precision: float = 0.95,
    budget: int = 50,
    image_root: str | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> LabelResult:
    """Predict every image of `unlabeled` (a folder, searched recursively, or a CSV with a 'path' column) with the
    run's calibrated model, and write into `out`: predictions.csv, pseudo_labels.csv (confidence at or above the
    threshold at which the validation split reaches `target_precision`, queued images excepted), to_label.csv (the
    `budget` images to label next: least certain first, spread over the backbone's feature space, near duplicates of
    labelled images left out and listed in left_out.csv), label_studio_tasks.json (the queue as Label Studio tasks: images under
    `image_root`, a URL prefix, else Label Studio's local-files route), fiftyone/ (the queue as a FiftyOne image
    classification dataset, unlabelled, the suggestions in suggestions.json), summary.json, summary.md and label.html."""
    if not 0.0 < target_precision < 1.0:
        raise UsageError(f"--target-precision {target_precision}: a precision between 0 and 1 (not 1 itself), e.g. 0.95")
    if budget < 0:
        raise UsageError(f"--budget {budget}: how many images to queue for labelling, 0 or more, e.g. 50")
    out = check_destination(out, reads=[Path(run)])
    inputs = _unlabeled_inputs(Path(unlabeled))
    predictor = Predictor(run)
    if predictor.trained.task.name == "multilabel":
        raise UsageError(f"label handles runs with one label per image for now; {run} gives several labels per image")
    rule = _pseudo_label_rule(predictor.trained, target_precision)  # refused before any unlabelled image is read
    preds = predictor.gathered_predictions(inputs, progress=progress)
    names = np.asarray(predictor.class_names, dtype=object)
    left_out = _left_out(preds, names, _labelled(predictor), progress=progress)
    queue = _queue(predictor.trained, preds, names, set(left_out["path"]), budget, progress=progress, cache_dir=cache_dir)
    # a queued image goes to a person, even above the threshold: the least confident pseudo-labels are the likeliest wrong
    keep = rule.keep(preds.probs) & ~np.isin(np.asarray(preds.paths, dtype=object), list(queue["path"]))
    pseudo = pd.DataFrame({"path": preds.paths, "label": names[preds.predicted], "confidence": preds.confidence})[keep]
    pseudo = pseudo.sort_values("confidence", kind="stable").reset_index(drop=True)
    table = predictor.table(preds)
    summary = _summary(rule, preds, pseudo, queue, left_out, budget=budget, run=run, unlabeled=unlabeled)
    base = Path(unlabeled) if Path(unlabeled).is_dir() else Path(unlabeled).parent
    confidence = dict(zip(preds.paths, preds.confidence.tolist()))
    tasks = label_studio_tasks(queue, confidence, base=base, image_root=image_root, model_version=f"finetune {run}")
    with published_together(out, LABEL_FILES) as staging:  # a kill leaves the previous set whole, never a mix
        _write(staging, table=table, pseudo=pseudo, queue=queue, left_out=left_out, summary=summary, class_names=list(names))
        write_text(staging / "label_studio_tasks.json", json.dumps(tasks, indent=1))
        write_fiftyone_dataset(staging / "fiftyone", queue, list(names))
    log.debug(  # the command prints it
        "%d of %d image(s) pseudo-labelled at confidence >= %.4f; %d queued to label next -> %s",
        len(pseudo),
        len(preds.paths),
        rule.threshold,
        len(queue),
        out / "label.html",
    )
    return LabelResult(out, table, pseudo, queue, left_out, rule, summary)


def _unlabeled_inputs(unlabeled: Path) -> list[str]:
    if not unlabeled.exists():
        raise UsageError(f"--unlabeled {unlabeled} does not exist; pass a folder of images or a CSV with a 'path' column")
    if unlabeled.is_file() and unlabeled.suffix.lower() in (".csv", ".tsv", ".txt"):
        return read_path_list(unlabeled)
    return [str(unlabeled)]


def _pseudo_label_rule(trained: TrainedModel, target: float) -> PseudoLabelRule:
    """The threshold on the run's own validation outputs (best.pt keeps them), calibrated as predictions are."""
    probs, targets = calibrated_validation(trained, instead="retrain the run to label with it")
    rule = precision_rule(probs, targets, target, class_names=list(trained.class_names))
    if rule is None:
        best = best_lower_bound(probs.max(axis=1), probs.argmax(axis=1) == targets)
        raise UsageError(
            f"no confidence threshold reaches precision {target:.1%} on the run's {len(targets)} validation images at "
            f"the 95% Wilson lower bound (the best threshold vouches for {best:.1%}; vouching for {target:.1%} takes at "
            f"least {images_to_vouch(target)} right answers); lower --target-precision, or give the run more validation images"
        )
    return rule


def _labelled(predictor: Predictor) -> pd.DataFrame:
    """The images the run was trained and validated on (splits.csv), those still on disk."""
    splits = predictor.run_dir.splits if predictor.run_dir is not None else None
    if splits is None or not splits.is_file():
        log.warning("no splits.csv beside the checkpoint: near duplicates of labelled images are not left out of the queue")
        return pd.DataFrame({"path": [], "label": []})
    table = read_text_table(splits)
    return table[[Path(p).is_file() for p in table["path"]]][["path", "label"]].reset_index(drop=True)


def _left_out(preds: Predictions, names: np.ndarray, labelled: pd.DataFrame, *, progress: bool) -> pd.DataFrame:
    """Unlabelled images that are exact or near duplicates (perceptual hash) of labelled ones, with the reason."""
    if labelled.empty:
        return pd.DataFrame(columns=QUEUE_COLUMNS)
    samples = pd.concat(
        [pd.DataFrame({"path": preds.paths, "label": "", "split": "unlabelled"}), labelled.assign(split="labelled")],
        ignore_index=True,
    )
    facts = examine_all(list(samples["path"]), progress=progress, cache=FactsCache.default())
    pairs = duplicate_pairs(samples, facts, max_distance=DUPLICATE_DISTANCE)
    pairs = pairs[pairs["split_a"] != pairs["split_b"]]
    reasons: dict[str, str] = {}
    for row in pairs.itertuples():
        new, old, known = (
            (row.path_a, row.path_b, row.label_b) if row.split_a == "unlabelled" else (row.path_b, row.path_a, row.label_a)
        )
        reasons.setdefault(new, f"{row.kind} of labelled {old} ('{known}', distance {row.distance})")
    rows = [i for i, p in enumerate(preds.paths) if p in reasons]
    uncertainty = 1 - margins(preds.probs)
    return pd.DataFrame(
        {
            "path": [preds.paths[i] for i in rows],
            "suggested_label": names[preds.predicted[rows]],
            "score": uncertainty[rows],
            "reason": [reasons[preds.paths[i]] for i in rows],
        },
        columns=QUEUE_COLUMNS,
    )


def _queue(
    trained: TrainedModel,
    preds: Predictions,
    names: np.ndarray,
    excluded: set[str],
    budget: int,
    *,
    progress: bool,
    cache_dir: str | Path | None,
) -> pd.DataFrame:
    """The next `budget` images to label: k-center greedy on the model's pooled features among the least certain."""
    rows = np.array([i for i, p in enumerate(preds.paths) if p not in excluded], dtype=np.int64)
    if budget == 0 or len(rows) == 0:
        return pd.DataFrame(columns=QUEUE_COLUMNS)
    probs = preds.probs[rows]
    order = np.argsort(margins(probs), kind="stable")[: budget * SHORTLIST]  # features only for the shortlist choose_queue uses
    features = _pooled(trained, [preds.paths[rows[i]] for i in order], progress=progress, cache_dir=cache_dir)
    choice = choose_queue(probs[order], features, budget)
    picked = rows[order[choice.rows]]
    ranked = np.argsort(-preds.probs[picked], axis=1)[:, :2]
    reasons = []
    for n, (i, (a, b), distance) in enumerate(zip(picked, ranked, choice.distances)):
        spread = f"feature distance {distance:.2f} from those above" if n else "the least certain image"
        reasons.append(f"{names[a]} {preds.probs[i, a]:.0%} vs {names[b]} {preds.probs[i, b]:.0%}; {spread}")
    return pd.DataFrame(
        {
            "path": [preds.paths[i] for i in picked],
            "suggested_label": names[preds.predicted[picked]],
            "score": 1 - margins(preds.probs[picked]),
            "reason": reasons,
        }
    )


def _pooled(trained: TrainedModel, paths: list[str], *, progress: bool, cache_dir: str | Path | None) -> np.ndarray:
    """The trained model's pooled backbone features (the classifier's input), through the feature cache."""
    pipeline = build_eval_pipeline(trained.image)
    root = Path(cache_dir) if cache_dir is not None else None
    return recipe_features(trained.bundle, paths, pipeline, trained.recipe, progress=progress, cache_dir=root)


def _summary(
    rule: PseudoLabelRule,
    preds: Predictions,
    pseudo: pd.DataFrame,
    queue: pd.DataFrame,
    left_out: pd.DataFrame,
    *,
    budget: int,
    run: str | Path,
    unlabeled: str | Path,
) -> dict[str, Any]:
    expected, at_low_end = rule.expected_wrong(len(pseudo))
    return {
        "run": str(run),
        "unlabeled": str(unlabeled),
        "images": len(preds.paths),
        "pseudo_labels": len(pseudo),
        "queued_above_threshold": int(rule.keep(preds.probs[np.isin(preds.paths, list(queue["path"]))]).sum()),
        "pseudo_label_coverage": len(pseudo) / max(1, len(preds.paths)),
        "pseudo_labels_per_class": {str(k): int(v) for k, v in pseudo["label"].value_counts().sort_index().items()},
        **rule.to_dict(),
        "expected_wrong_labels": expected,
        "expected_wrong_labels_at_ci_low": at_low_end,
        "budget": budget,
        "queued": len(queue),
        "left_out_duplicates": len(left_out),
    }


def _markdown(summary: dict[str, Any]) -> str:
    low, high = summary["validation_precision_ci95"]
    return "\n".join(
        [
            "# Labelling summary",
            "",
            f"- unlabelled images: {summary['images']} ({escape_markdown(summary['unlabeled'])})",
            f"- pseudo-labels: {summary['pseudo_labels']} ({summary['pseudo_label_coverage']:.1%}) at or above their "
            f"class's threshold (global {summary['threshold']:.4f}), each the lowest whose 95% Wilson lower bound of "
            f"validation precision reaches {summary['target_precision']:.1%} "
            f"({summary['queued_above_threshold']} more above it are in the queue, for a person)",
            f"- on the run's validation split these thresholds answer {summary['validation_answered']} of "
            f"{summary['validation_images']} images at precision {summary['validation_precision']:.1%} "
            f"(95% Wilson interval {low:.1%}-{high:.1%})",
            f"- a class's own threshold needs at least {summary['images_to_vouch']} validation images predicted as it; "
            "with fewer it takes the global one, and a class whose answers never reach the target gets none:",
            *[f"  - {escape_markdown(name)}: {_class_line(c)}" for name, c in summary["per_class"].items()],
            f"- expected wrong pseudo-labels: {summary['expected_wrong_labels']:.1f} "
            f"(up to {summary['expected_wrong_labels_at_ci_low']:.1f} at the interval's low end)",
            f"- queued to label next: {summary['queued']} of a budget of {summary['budget']} (to_label.csv); "
            f"{summary['left_out_duplicates']} near duplicate(s) of labelled images left out (left_out.csv)",
            "",
        ]
    )


def _class_line(entry: dict[str, Any]) -> str:
    seen = f"{entry['validation_predicted']} validation image(s) predicted as it"
    if entry["rule"] == "none":
        return f"no pseudo-labels: its {seen} reach the target at no threshold"
    how = "its own" if entry["rule"] == "own" else "the global"
    precision = entry["validation_precision"]
    shown = f", {entry['validation_answered']} kept at precision {precision:.1%}" if precision is not None else ""
    return f"{how} threshold {entry['threshold']:.4f} ({seen}{shown})"


def _write(
    out: Path,
    *,
    table: pd.DataFrame,
    pseudo: pd.DataFrame,
    queue: pd.DataFrame,
    left_out: pd.DataFrame,
    summary: dict[str, Any],
    class_names: list[str],
) -> None:
    write_table(table, out / "predictions.csv", float_format="%.6f")
    write_table(pseudo, out / "pseudo_labels.csv", float_format="%.6f")
    write_table(queue, out / "to_label.csv", float_format="%.6f")
    write_table(left_out, out / "left_out.csv", float_format="%.6f")
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    markdown = _markdown(summary)
    write_text(out / "summary.md", markdown)
    intro = [line.strip().removeprefix("- ") for line in markdown.splitlines()[2:] if line]
    galleries = [queue_gallery(queue), *pseudo_label_galleries(pseudo, class_names)]
    extra = left_out_gallery(left_out)
    render_label_page(
        out / "label.html", title="Label the rest", intro=intro, galleries=[*galleries, *([extra] if extra else [])]
    )
