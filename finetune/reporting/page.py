"""Small self-contained HTML pages (the leaderboard, the report diff): sections of text, tables and inline figures,
rendered with Jinja2's autoescape so every run, class and file name reaches the page as text, never markup."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from finetune.files import write_text
from finetune.reporting.html import png_b64


@dataclass(frozen=True)
class Link:
    """A table cell that links to a file beside the page (`href` relative to it)."""

    text: str
    href: str


@dataclass
class Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None  # cells as shown (strings or Links)
    figure: Path | None = None  # a PNG, embedded
    banner: str | None = None  # one sentence in a box above the rest: what to take away


def relative_link(text: str, path: str) -> Link:
    """A link to `path` (relative, '/'-separated) whose every part is URL-quoted: any run name makes a valid href."""
    return Link(text=text, href="/".join(quote(part) for part in path.split("/")))


def write_page(path: Path, *, title: str, intro: list[str], sections: list[Section]) -> None:
    """One HTML file, figures inline as data URIs, nothing fetched from elsewhere."""
    env = Environment(loader=PackageLoader("finetune.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    shown = [
        {
            "heading": s.heading,
            "paragraphs": s.paragraphs,
            "banner": s.banner,
            "columns": [str(c) for c in s.table.columns] if s.table is not None else [],
            "rows": s.table.itertuples(index=False, name=None) if s.table is not None else [],
            "figure": png_b64(s.figure) if s.figure is not None and s.figure.exists() else None,
        }
        for s in sections
    ]
    html = env.get_template("page.html.j2").render(
        title=title, intro=intro, sections=shown, written=time.strftime("%Y-%m-%d %H:%M")
    )
    write_text(path, html)
