"""label.html: the queue to label next and the pseudo-labels per class (lowest confidence first), as thumbnails in one
self-contained page (images embedded, every name escaped by Jinja2's autoescape)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from finetune.data.decode import printable
from finetune.evaluation.labeling import SHORTLIST
from finetune.files import write_text
from finetune.reporting.html import name_parts, thumbnail

THUMBNAILS_PER_CLASS = 48  # a class's least confident pseudo-labels shown; the CSV has them all


@dataclass
class Gallery:
    heading: str
    items: list[dict[str, object]] = field(default_factory=list)
    paragraphs: list[str] = field(default_factory=list)
    banner: str | None = None


def _item(path: str, headline: str, why: str = "") -> dict[str, object]:
    return {"path": printable(path), "name_parts": name_parts(path), "image": thumbnail(path), "headline": headline, "why": why}


def queue_gallery(queue: pd.DataFrame) -> Gallery:
    items = [
        _item(row.path, f"#{n + 1} {row.suggested_label}?", f"uncertainty {row.score:.2f}")
        for n, row in enumerate(queue.itertuples())
    ]
    words = (  # the queue is diverse, not sorted by doubt: a 0.01 after a 0.94 is no mistake, and the page says why
        "Label these first, in this order: the first is the image the model is least sure of; each next one is, among "
        f"the (up to {SHORTLIST * len(queue)}) images it is least sure of, the one least like those before it. Under each: "
        "its uncertainty, 1 minus the margin between its two likeliest classes."
    )
    return Gallery(f"Label next ({len(queue)})", items, [words] if items else ["Nothing to label: the queue is empty."])


def pseudo_label_galleries(pseudo: pd.DataFrame, class_names: list[str]) -> list[Gallery]:
    """One gallery per class, lowest confidence first: the pseudo-labels worth a glance are at the top."""
    galleries = []
    for name in class_names:
        rows = pseudo[pseudo["label"] == name].sort_values("confidence", kind="stable")
        if rows.empty:
            continue
        shown = rows.head(THUMBNAILS_PER_CLASS)
        items = [_item(row.path, f"{row.confidence:.1%}") for row in shown.itertuples()]
        more = [f"{len(shown)} of {len(rows)} shown; pseudo_labels.csv lists them all."] if len(rows) > len(shown) else []
        galleries.append(Gallery(f"Pseudo-labelled '{name}' ({len(rows)}), lowest confidence first", items, more))
    return galleries


def left_out_gallery(left_out: pd.DataFrame) -> Gallery | None:
    if left_out.empty:
        return None
    items = [_item(row.path, row.suggested_label, row.reason) for row in left_out.head(THUMBNAILS_PER_CLASS).itertuples()]
    return Gallery(
        f"Left out of the queue ({len(left_out)})", items, ["Near duplicates of images the run already has labels for."]
    )


def render_label_page(path: Path, *, title: str, intro: list[str], galleries: list[Gallery]) -> None:
    env = Environment(loader=PackageLoader("finetune.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    sections = [{"heading": g.heading, "paragraphs": g.paragraphs, "banner": g.banner, "pictures": g.items} for g in galleries]
    html = env.get_template("label.html.j2").render(
        title=title, intro=intro, sections=sections, written=time.strftime("%Y-%m-%d %H:%M")
    )
    write_text(path, html)
