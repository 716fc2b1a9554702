"""report.html: one self-contained file (figures and thumbnails embedded as data URIs), rendered with Jinja2.

Every class and file name reaches the page escaped: Jinja2 autoescapes the template, and the pandas tables are
styled with escape="html".
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from pandas.io.formats.style import Styler
from PIL import Image

from finetune.config.catalog import STAGES
from finetune.data.decode import load_image, printable
from finetune.errors import DataError
from finetune.evaluation.intervals import RESAMPLES
from finetune.evaluation.metrics import per_image_loss
from finetune.evaluation.scorecard import Scorecard
from finetune.files import read_table, read_text_table, write_text
from finetune.inference.predictions import Predictions
from finetune.reporting.summary import calibration_sentence, coverage_sentence, split_sentence
from finetune.run_dir import RunDir

SECTIONS = [
    ("summary", "Run summary"),
    ("metrics", "Metrics"),
    ("per-class", "Per class"),
    ("confusion", "Confusion matrix"),
    ("confused", "Most confused"),
    ("curves", "Training curves"),
    ("errors", "Top losses"),
    ("unsure", "Least confident"),
    ("calibration", "Calibration"),
    ("reject", "Reject option"),
    ("augmentation", "Augmentation"),
]
GALLERY_SIZE = 12
F1_BAR = "F1 (0 to 1)"  # the per-class table's bar column
SCORE_NAMES = {"ece": "ECE (calibration error)", "nll": "NLL (log loss)", "brier": "Brier score"}  # not percentages
# overlays for (image paths, class indices): Grad-CAM pictures, RGB uint8, one per image
Explain = Callable[[Sequence[str], Sequence[int]], list[np.ndarray]]


@dataclass
class RunContext:
    """What the report knows beyond the predictions: the checkpoint's metadata, the run folder, which split."""

    meta: dict[str, Any]  # checkpoint payload without the weights
    run: RunDir | None = None
    split: str = "val"
    selection: bool | str = False  # the split chose the best epoch (or why else the images are not new): optimistic
    extra: dict[str, Any] = field(default_factory=dict)
    tta: tuple[str, ...] = ()  # test-time views averaged into the probabilities
    leaks: pd.DataFrame | None = None  # the run's duplicate pairs across splits (leakage.csv): the banner says so
    # cross-validation: each fold's run folder and the epoch its best.pt holds; their curves are the report's
    folds: list[tuple[RunDir, int | None]] = field(default_factory=list)


def png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _b64(image: Image.Image, size: int = 128) -> str:
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail(path: str, size: int = 128) -> str:
    try:
        image = Image.fromarray(load_image(path))
    except DataError:
        image = Image.new("RGB", (size, size), "lightgrey")
    return _b64(image, size)


def name_parts(path: str) -> list[str]:
    """A file name cut after _ - . so a long name wraps there rather than mid-word."""
    return [part for part in re.split(r"(?<=[_\-.])", Path(printable(path)).name) if part]


def _gallery(preds: Predictions, class_names: list[str], chosen: list[int], explain: Explain | None) -> list[dict[str, Any]]:
    cams = explain([preds.paths[i] for i in chosen], [int(preds.predicted[i]) for i in chosen]) if explain and chosen else []
    return [
        {
            "path": printable(preds.paths[i]),
            "name_parts": name_parts(preds.paths[i]),
            "image": thumbnail(preds.paths[i]),
            "cam": _b64(Image.fromarray(cams[n])) if cams else None,
            "true": class_names[preds.targets[i]],
            "pred": class_names[preds.predicted[i]],
            "conf": f"{preds.probs[i].max():.0%}",
        }
        for n, i in enumerate(chosen)
    ]


def escaped_table(frame: pd.DataFrame, formats: dict[str, Any] | str | None = None) -> Styler:
    """A Styler whose cells and labels are HTML-escaped (class and file names are data, never markup), without the
    empty header row pandas adds for index and column names."""
    styler = frame.style.format(formats, escape="html")
    styler = styler.format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    return styler.hide(names=True, axis="index").hide(names=True, axis="columns")


def _per_class_html(per_class: pd.DataFrame) -> str:
    table = per_class.sort_values("f1").reset_index(drop=True)
    worst = max(1, min(3, len(table) // 3))
    flagged = [i < worst and f1 < table["f1"].max() for i, f1 in enumerate(table["f1"])]  # nothing to flag when all are equal
    shown = pd.DataFrame({"": ["\u26a0" if flag else "" for flag in flagged], "class": table["class"]})
    for name in ("precision", "recall", "f1"):
        shown[name] = table[name]
        shown[f"{name} 95% CI"] = [f"{lo:.3f}-{hi:.3f}" for lo, hi in zip(table[f"{name}_lo"], table[f"{name}_hi"])]
    shown["support"] = table["support"]
    shown[F1_BAR] = table["f1"]  # the bar gets a cell of its own: drawn behind the number, it hid it
    formats = {"precision": "{:.3f}", "recall": "{:.3f}", "f1": "{:.3f}", F1_BAR: lambda _: ""}
    styler = escaped_table(shown, formats).hide(axis="index")
    styler = styler.bar(subset=[F1_BAR], vmin=0, vmax=1, color="#9ecae1", height=60)
    styler = styler.set_properties(subset=[F1_BAR], **{"min-width": "8em"})
    return styler.apply(lambda row: ["color:#b00;font-weight:600" if row.iloc[0] else "" for _ in row], axis=1).to_html()


def _counts_html(card: Scorecard) -> str | None:
    """Counts, coloured by the share of their row (like the matrix figure), not by raw size."""
    if len(card.counts) > 30:
        return None
    styler = escaped_table(card.counts).background_gradient(
        cmap="Blues", axis=None, gmap=card.normalized.to_numpy(), vmin=0, vmax=1
    )
    return styler.to_html()


def _phases(recipe: dict[str, Any]) -> str:
    train = recipe.get("train", {})
    phases = train.get("phases") or [
        {
            "epochs": train.get("epochs"),
            "lr": train.get("lr"),
            "norm": train.get("norm", train.get("bn")),
            "trainable": train.get("trainable") or _complement(train.get("freeze")),
        }
    ]
    described = []
    for phase in phases:
        trainable = phase.get("trainable", "all")
        every = trainable in ("all", None) or set(trainable) == set(STAGES)
        stages = "all stages" if every else " + ".join(trainable)
        norm = "trains (no stage is frozen)" if every else _norm(phase)  # the policy is for frozen stages
        described.append(f"{phase.get('epochs')} epoch(s) training {stages} at lr {phase.get('lr'):g}, norm {norm}")
    return "; then ".join(described)


def _norm(phase: dict[str, Any]) -> str:
    """A phase's norm: policy, in a recipe written before (`bn:`) or after it was renamed."""
    return str(phase.get("norm") or phase.get("bn") or "frozen")


def _complement(frozen: list[str] | None) -> list[str] | str:
    return "all" if not frozen else [s for s in STAGES if s not in frozen]


def _summary_rows(ctx: RunContext | None, metrics: dict[str, Any]) -> tuple[list[tuple[str, str]], str | None]:
    if ctx is None:
        return [("images evaluated", str(metrics["num_images"]))], None
    recipe, image = ctx.meta.get("recipe", {}), ctx.meta.get("image", {})
    rows = [
        ("model", f"{ctx.meta.get('model_name')} (pretrained: {recipe.get('model', {}).get('pretrained')})"),
        ("input", f"{image.get('input_size')} px, mean {image.get('mean')}, std {image.get('std')}"),
        ("training", _phases(recipe)),
        ("data", str(recipe.get("data", {}).get("path"))),
        ("evaluated on", f"the {ctx.split} split, {metrics['num_images']} images, {metrics['num_classes']} classes"),
        ("best epoch", str(ctx.meta.get("epoch", "?"))),
    ]
    precision = ctx.meta.get("precision")  # what train.amp / channels_last became for this run, and why
    if precision:
        how = "fp32" if precision.get("amp") == "off" else f"{precision.get('amp')} autocast"
        layout = ", channels_last" if precision.get("channels_last") else ""
        rows.append(("trained in", f"{how}{layout} ({precision.get('reason')})"))
    rows += [(key, str(value)) for key, value in ctx.extra.items()]
    split_counts = None
    if ctx.run is not None and ctx.run.splits.exists():
        counts = read_text_table(ctx.run.splits).groupby(["label", "split"]).size().unstack(fill_value=0)
        counts.loc["total"] = counts.sum()
        rows.append(("split sizes", ", ".join(f"{k}: {v}" for k, v in counts.loc["total"].items())))
        split_counts = escaped_table(counts).to_html()
    if ctx.run is not None and ctx.run.metrics.exists():
        history = read_table(ctx.run.metrics)
        rows.append(("training time", f"{history['seconds'].sum():.0f} s over {len(history)} epochs"))
    histories = [read_table(run.metrics) for run, _ in ctx.folds if run.metrics.exists()]
    if histories:
        seconds, epochs = sum(h["seconds"].sum() for h in histories), sum(len(h) for h in histories)
        rows.append(("training time", f"{seconds:.0f} s over {epochs} epochs in {len(histories)} folds"))
    return rows, split_counts


def _cards(metrics: dict[str, Any]) -> list[dict[str, str]]:
    cards = []
    for key, value in metrics.items():
        if isinstance(value, float):
            bounds = metrics.get("ci95", {}).get(key)
            shown = f"{value:.3f}" if key in SCORE_NAMES else f"{value:.1%}"
            ci = f"{bounds[0]:.1%}-{bounds[1]:.1%}" if bounds else ""
            cards.append({"name": SCORE_NAMES.get(key, key.replace("_", " ")), "value": shown, "ci": ci})
    return cards


def _calibration_html(metrics: dict[str, Any]) -> str | None:
    calibration = metrics.get("calibration", {})
    columns = {name: calibration[name] for name in ("before", "after") if name in calibration}
    if len(columns) < 2:
        return None
    names = {"before": "before (T = 1)", "after": f"after (T = {calibration['temperature']:.2f})"}
    table = pd.DataFrame(columns).rename(columns=names, index={"ece": "ECE", "nll": "NLL", "brier": "Brier"})
    return escaped_table(table, "{:.4f}").to_html()


def render_html(
    *,
    path: Path,
    title: str,
    preds: Predictions,
    class_names: list[str],
    card: Scorecard,
    bins: int,
    figures: dict[str, Path | None],
    ctx: RunContext | None,
    explain: Explain | None = None,
) -> None:
    """Fill the Jinja2 template and write one HTML file with everything embedded."""
    correct = preds.predicted == preds.targets
    losses = [int(i) for i in np.argsort(-per_image_loss(preds)) if not correct[i]][:GALLERY_SIZE]
    unsure = [int(i) for i in np.argsort(preds.probs.max(axis=1)) if correct[i]][:GALLERY_SIZE]
    summary, split_counts = _summary_rows(ctx, card.metrics)
    meta = ctx.meta if ctx else {}
    env = Environment(loader=PackageLoader("finetune.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=title,
        written=time.strftime("%Y-%m-%d %H:%M"),
        sections=SECTIONS,
        summary=summary,
        split_counts=split_counts,
        split_note=split_sentence(ctx.split, ctx.selection, ctx.leaks) if ctx else None,
        selection=bool(ctx and (ctx.selection or (ctx.leaks is not None and len(ctx.leaks)))),  # a warning banner
        recipe_yaml=yaml.safe_dump(meta.get("recipe", {}), sort_keys=False),
        versions=meta.get("versions", {}),
        versions_text="\n".join(f"{k}: {v}" for k, v in meta.get("versions", {}).items()),
        cards=_cards(card.metrics),
        resamples=RESAMPLES,
        per_class=_per_class_html(card.per_class),
        counts_table=_counts_html(card),
        confused=escaped_table(card.confused, {"fraction_of_true": "{:.1%}"}).hide(axis="index").to_html()
        if len(card.confused)
        else None,
        top_losses=_gallery(preds, class_names, losses, explain),
        unsure=_gallery(preds, class_names, unsure, explain),
        explained=explain is not None,
        calibration_note=calibration_sentence(card.metrics),
        calibration_table=_calibration_html(card.metrics),
        coverage_note=coverage_sentence(card.metrics),
        bins=bins,
        images={name: png_b64(p) if p is not None and p.exists() else None for name, p in figures.items()},
        folds=len(ctx.folds) if ctx else 0,
    )
    write_text(path, html)
