"""README.md of a Hub folder: a model card whose YAML metadata the Hub reads (library, task, license, model-index
with the test split's numbers and their intervals) and whose body is written from the run: data, recipe,
calibration, reject threshold, per-class table, limitations and how to load it.

Everything in it comes from the run's own files; no local path reaches it (a folder's name at most), and every
class or data name is escaped for Markdown.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

from finetune.config.catalog import TV_PREFIX
from finetune.errors import RunDirError
from finetune.files import read_text_table
from finetune.inference.checkpoint import TrainedModel
from finetune.reporting.summary import calibration_sentence, coverage_sentence, interval, split_sentence
from finetune.run_dir import RunDir

CARD = "README.md"
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~&$])")
# metrics.json name -> (model-index type, the name shown on the Hub)
INDEX_METRICS = {"accuracy": ("accuracy", "Accuracy"), "balanced_accuracy": ("balanced_accuracy", "Balanced accuracy")}
INDEX_METRICS |= {"macro_f1": ("f1", "Macro F1")}


def escape_markdown(text: Any) -> str:
    """A name as literal Markdown text: its punctuation backslash-escaped, line breaks as spaces."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


@dataclass
class CardFacts:
    """What the card says, gathered from the run folder and the export."""

    name: str  # the model's name on the Hub (the repository's name, or the folder's)
    dataset: str  # the data folder's name
    license: str
    loaded: TrainedModel
    metrics: dict[str, Any]
    per_class: pd.DataFrame
    splits: pd.DataFrame
    leaks: pd.DataFrame | None
    reject: dict[str, Any] | None
    parity: dict[str, Any]
    files: list[tuple[str, str]] = field(default_factory=list)  # (file name, what it is)
    repo_id: str | None = None


def check_report(run: RunDir) -> tuple[Path, Path]:
    """The run's report/metrics.json and per_class.csv, whose numbers the card quotes (train writes them)."""
    metrics_file, per_class_file = run.report / "metrics.json", run.report / "per_class.csv"
    if not metrics_file.is_file() or not per_class_file.is_file():
        raise RunDirError(
            f"{run.root} has no report/metrics.json and per_class.csv for the model card; "
            f"write them with 'finetune eval {run.root} --data FOLDER', then export again"
        )
    return metrics_file, per_class_file


def gather(
    run: RunDir, loaded: TrainedModel, *, name: str, license: str, parity: dict[str, Any], files: list[tuple[str, str]]
) -> CardFacts:
    """Read the run's report (metrics.json, per_class.csv), splits, leakage and reject threshold."""
    metrics_file, per_class_file = check_report(run)
    splits = read_text_table(run.splits)
    leaks = read_text_table(run.leakage) if run.leakage.is_file() and run.leakage.stat().st_size else None
    reject = json.loads(run.reject.read_text(encoding="utf-8")) if run.reject.is_file() else None
    return CardFacts(
        name=name,
        dataset=_dataset_name(list(splits["path"])),
        license=license,
        loaded=loaded,
        metrics=json.loads(metrics_file.read_text(encoding="utf-8")),
        per_class=read_text_table(per_class_file),
        splits=splits,
        leaks=leaks,
        reject=reject,
        parity=parity,
        files=files,
    )


def _dataset_name(paths: list[str]) -> str:
    """The name (never the path) of the folder all images sit under, above train/val/test or class folders."""
    try:
        common = Path(os.path.commonpath(paths))
    except ValueError:
        return "images"
    if common.suffix:  # a single image
        common = common.parent
    while common.name in ("train", "val", "valid", "validation", "test") and common.parent != common:
        common = common.parent
    return common.name or "images"


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """The card's YAML metadata: what the Hub indexes and shows beside the model."""
    split = facts.metrics.get("evaluated_on", {}).get("split", "test")
    metrics = []
    for key, (kind, title) in INDEX_METRICS.items():
        if key not in facts.metrics:
            continue
        entry: dict[str, Any] = {"type": kind, "value": round(float(facts.metrics[key]), 4), "name": title}
        bounds = facts.metrics.get("ci95", {}).get(key)
        if bounds is not None:
            entry["name"] = f"{title} (95% CI {bounds[0]:.3f}-{bounds[1]:.3f})"
            entry["args"] = {"ci95_low": round(float(bounds[0]), 4), "ci95_high": round(float(bounds[1]), 4)}
        if kind == "f1":
            entry["config"] = "macro"
        metrics.append(entry)
    result = {
        "task": {"type": "image-classification", "name": "Image Classification"},
        "dataset": {"name": facts.dataset, "type": "imagefolder", "split": split},
        "metrics": metrics,
    }
    arch = facts.loaded.recipe.model.name
    return {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "license": facts.license,
        "tags": ["image-classification", "timm", "finetune", arch.removeprefix(TV_PREFIX)],
        "metrics": sorted({m["type"] for m in metrics}),
        "model-index": [{"name": facts.name, "results": [result]}],
    }


def _pretrained_words(pretrained: bool | Path) -> str:
    if pretrained is True:
        return "the backbone's ImageNet weights (timm / torchvision)"
    if pretrained is False:
        return "random weights (model.pretrained: false)"
    return "weights from a local file (not published here)"


def _limitations(facts: CardFacts) -> list[str]:
    recipe, metrics = facts.loaded.recipe, facts.metrics
    evaluated = metrics.get("evaluated_on", {})
    split, count = evaluated.get("split", "test"), int(metrics.get("num_images", 0))
    said = []
    if recipe.model.pretrained is False:
        said.append("Trained from random features (model.pretrained: false): nothing was learnt before this data set.")
    if split != "test" or evaluated.get("selection_split"):
        said.append(f"There was no test split: the numbers on the {split} split are optimistic (it chose the kept epoch).")
    if facts.leaks is not None and len(facts.leaks):
        said.append(split_sentence(split, False, facts.leaks).split(". ", 1)[-1])
    if count < 200:
        said.append(f"The {split} split has {count} images: the intervals are wide; quote them, not the point values.")
    said.append(
        f"It knows only its {len(facts.loaded.class_names)} classes: an image of anything else still gets one of them, "
        "often confidently. The reject threshold helps with doubt between known classes, not with unknown ones."
    )
    if recipe.eval.tta:
        said.append(
            f"The reported numbers average test-time views ({', '.join(recipe.eval.tta)}); one plain forward pass differs a little."
        )
    return said


def _split_table(splits: pd.DataFrame, classes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for split in ("train", "val", "test"):
        part = splits[splits["split"] == split]
        if len(part):
            counts = part["label"].astype(str).value_counts()
            rows.append({"split": split, "images": len(part), "per_class": [int(counts.get(c, 0)) for c in classes]})
    return rows


def _recipe_lines(facts: CardFacts) -> list[str]:
    recipe = facts.loaded.recipe
    phases = recipe.train.resolved_phases()
    plan = "; ".join(
        f"{p.epochs} epoch(s) training {p.trainable if isinstance(p.trainable, str) else ', '.join(p.trainable)} at lr {p.lr:g}"
        for p in phases
    )
    image = facts.loaded.image
    head = recipe.model.head
    return [
        f"backbone `{recipe.model.name}`, started from {_pretrained_words(recipe.model.pretrained)}",
        f"head: {'linear' if head.hidden is None else f'hidden layer of {head.hidden}'}"
        + (f", dropout {head.dropout:g}" if head.dropout else ""),
        f"input {image.input_size} x {image.input_size} px (shorter side resized to {int(image.input_size / image.crop_pct)}, "
        f"{image.interpolation}, centre crop), mean {list(image.mean)}, std {list(image.std)}",
        f"{plan}; batch size {recipe.data.batch_size}, seed {recipe.seed}",
    ]


def _per_class_rows(per_class: pd.DataFrame) -> list[dict[str, Any]]:
    """Each class as 'value [lo, hi]' cells for precision, recall and F1, in the model's class order."""
    rows = []
    for row in per_class.to_dict("records"):
        cells = []
        for key in ("precision", "recall", "f1"):
            low, high = row.get(f"{key}_lo"), row.get(f"{key}_hi")
            bounds = f" [{float(low):.3f}, {float(high):.3f}]" if low not in (None, "") and high not in (None, "") else ""
            cells.append(f"{float(row[key]):.3f}{bounds}")
        rows.append({"name": row["class"], "cells": cells, "support": int(float(row["support"]))})
    return rows


def card_text(facts: CardFacts) -> str:
    """The whole README.md: YAML front matter, then the body from templates/model_card.md.j2."""
    env = Environment(loader=PackageLoader("finetune.reporting", "templates"), autoescape=False, undefined=StrictUndefined)
    env.filters["md"] = escape_markdown
    metrics, loaded = facts.metrics, facts.loaded
    split = metrics.get("evaluated_on", {}).get("split", "test")
    body = env.get_template("model_card.md.j2").render(
        facts=facts,
        classes=loaded.class_names,
        split=split,
        trust=split_sentence(split, metrics.get("evaluated_on", {}).get("selection_split", False), facts.leaks),
        headline=[
            (title[0].lower() + title[1:], interval(metrics, k)) for k, (_, title) in INDEX_METRICS.items() if k in metrics
        ],
        per_class=_per_class_rows(facts.per_class),
        calibration=calibration_sentence(metrics),
        coverage=coverage_sentence(metrics),
        splits=_split_table(facts.splits, loaded.class_names),
        recipe=_recipe_lines(facts),
        limitations=_limitations(facts),
        temperature=loaded.temperature,
        probability_rule=loaded.task.probability_rule,
        timm_parity=facts.parity.get("timm_transform"),
    )
    meta = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n{body.strip()}\n"
