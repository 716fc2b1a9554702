"""report.html: one self-contained file (figures and thumbnails embedded as data URIs), rendered with Jinja2."""

from __future__ import annotations

import base64
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from pandas.io.formats.style import Styler
from PIL import Image

from finetune.data.decode import load_image
from finetune.errors import DataError
from finetune.evaluation.inference import Predictions
from finetune.evaluation.metrics import per_image_loss
from finetune.files import read_table, read_text_table, write_text
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
    ("augmentation", "Augmentation"),
]


@dataclass
class RunContext:
    """What the report knows about the run beyond the predictions: the checkpoint's metadata and run folder."""

    meta: dict[str, Any]  # checkpoint payload without the state dict
    run: RunDir | None = None
    split: str = "val"
    extra: dict[str, Any] = field(default_factory=dict)


def png_b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _thumbnail(path: str, size: int = 128) -> str:
    try:
        image = Image.fromarray(load_image(path))
    except DataError:
        image = Image.new("RGB", (size, size), "lightgrey")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _gallery(preds: Predictions, class_names: list[str], mask: np.ndarray, order: np.ndarray, limit: int) -> list[dict[str, str]]:
    chosen = [i for i in order if mask[i]][:limit]
    return [
        {
            "path": preds.paths[i],
            "name": Path(preds.paths[i]).name,
            "image": _thumbnail(preds.paths[i]),
            "true": class_names[preds.targets[i]],
            "pred": class_names[preds.predicted[i]],
            "conf": f"{preds.probs[i].max():.0%}",
        }
        for i in chosen
    ]


def _escaped(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> Styler:
    """A Styler whose cells and labels are HTML-escaped (class and file names are data, never markup), with number formats."""
    styler = frame.style.format(formats, escape="html")
    return styler.format_index(escape="html", axis=0).format_index(escape="html", axis=1)


def _per_class_html(per_class: pd.DataFrame) -> str:
    table = per_class.sort_values("f1").reset_index(drop=True)
    worst = max(1, min(3, len(table) // 3))
    flagged = [i < worst and f1 < table["f1"].max() for i, f1 in enumerate(table["f1"])]  # nothing to flag when all are equal
    table.insert(0, "", ["\u26a0" if flag else "" for flag in flagged])
    styler = _escaped(table, {"precision": "{:.3f}", "recall": "{:.3f}", "f1": "{:.3f}"}).hide(axis="index")
    styler = styler.bar(subset=["f1"], vmin=0, vmax=1, color="#9ecae1")
    return styler.apply(lambda row: ["color:#b00;font-weight:600" if row.iloc[0] else "" for _ in row], axis=1).to_html()


def _summary_rows(ctx: RunContext | None, metrics: dict[str, Any]) -> tuple[list[tuple[str, str]], str | None]:
    if ctx is None:
        return [("images evaluated", str(metrics["num_images"]))], None
    recipe = ctx.meta.get("recipe", {})
    phases = recipe.get("train", {}).get("phases") or [
        {
            "epochs": recipe.get("train", {}).get("epochs"),
            "freeze": recipe.get("train", {}).get("freeze"),
            "lr": recipe.get("train", {}).get("lr"),
        }
    ]
    rows = [
        ("model", f"{ctx.meta.get('model_name')} (pretrained: {recipe.get('model', {}).get('pretrained')})"),
        (
            "input",
            f"{ctx.meta.get('image', {}).get('input_size')} px, mean {ctx.meta.get('image', {}).get('mean')}, std {ctx.meta.get('image', {}).get('std')}",
        ),
        ("phases", "; ".join(", ".join(f"{k}={v}" for k, v in phase.items() if v not in (None, {}, [])) for phase in phases)),
        ("data", str(recipe.get("data", {}).get("path"))),
        ("evaluated on", f"{ctx.split} split, {metrics['num_images']} images, {metrics['num_classes']} classes"),
        ("best epoch", str(ctx.meta.get("epoch", "?"))),
    ]
    rows += [(key, str(value)) for key, value in ctx.extra.items()]
    split_counts = None
    if ctx.run is not None and ctx.run.splits.exists():
        splits = read_text_table(ctx.run.splits)
        counts = splits.groupby(["label", "split"]).size().unstack(fill_value=0)
        counts.loc["total"] = counts.sum()
        rows.append(("split sizes", ", ".join(f"{k}: {v}" for k, v in counts.loc["total"].items())))
        split_counts = counts.to_html()
    if ctx.run is not None and ctx.run.metrics.exists():
        history = read_table(ctx.run.metrics)
        rows.append(("training time", f"{history['seconds'].sum():.0f} s over {len(history)} epochs"))
    return rows, split_counts


def render_html(
    *,
    path: Path,
    title: str,
    preds: Predictions,
    class_names: list[str],
    metrics: dict[str, Any],
    per_class: pd.DataFrame,
    counts: pd.DataFrame,
    confused: pd.DataFrame,
    bins: int,
    figures: dict[str, Path | None],
    ctx: RunContext | None,
    gallery_size: int = 12,
) -> None:
    """Fill the Jinja2 template and write one HTML file with everything embedded."""
    loss = per_image_loss(preds)
    correct = preds.predicted == preds.targets
    confidence = preds.probs.max(axis=1)
    summary, split_counts = _summary_rows(ctx, metrics)
    headline = [
        (
            k.replace("_", " "),
            f"{v:.2%}" if k != "ece" and isinstance(v, float) else (f"{v:.3f}" if isinstance(v, float) else str(v)),
        )
        for k, v in metrics.items()
        if not isinstance(v, dict)
    ]
    meta = ctx.meta if ctx else {}
    env = Environment(loader=PackageLoader("finetune.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=title,
        written=time.strftime("%Y-%m-%d %H:%M"),
        sections=SECTIONS,
        summary=summary,
        split_counts=split_counts,
        recipe_yaml=yaml.safe_dump(meta.get("recipe", {}), sort_keys=False),
        versions=meta.get("versions", {}),
        versions_text="\n".join(f"{k}: {v}" for k, v in meta.get("versions", {}).items()),
        headline=headline,
        per_class=_per_class_html(per_class),
        counts_table=_escaped(counts).background_gradient(cmap="Blues", axis=1).to_html() if len(counts) <= 30 else None,
        confused=_escaped(confused, {"fraction_of_true": "{:.1%}"}).hide(axis="index").to_html() if len(confused) else None,
        top_losses=_gallery(preds, class_names, ~correct, np.argsort(-loss), gallery_size),
        unsure=_gallery(preds, class_names, correct, np.argsort(confidence), gallery_size),
        ece=f"{metrics['ece']:.4f}",
        bins=bins,
        images={name: png_b64(p) if p is not None and p.exists() else None for name, p in figures.items()},
    )
    write_text(path, html)
