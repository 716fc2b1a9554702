"""Markdown whose names are text, never markup: a class, file, recipe or folder named `a|b`, `*x*`, `<script>` or
`[x](y)` reaches leaderboard.md, summary.md, diff.md, cv_summary.md and the model card as typed, and cannot break a
table or start a link, an emphasis, an HTML tag or a formula."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import pandas as pd

# Backslash-escaped wherever they stand: CommonMark treats any escaped ASCII punctuation as the character itself
ALWAYS = r"\\`*\[\]<>|~&$"
# '_' opens or closes emphasis only beside a non-alphanumeric: 'macro_f1' and 'img_01.jpg' are left readable
SPECIAL = re.compile(rf"[{ALWAYS}]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape_markdown(text: Any) -> str:
    """`text` as literal inline Markdown: special punctuation backslash-escaped, line breaks and tabs as spaces, other
    control characters shown as \\xNN."""
    flat = " ".join(str(text).split())
    visible = CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", flat)
    return SPECIAL.sub(lambda found: "\\" + found.group(), visible)


def markdown_table(frame: pd.DataFrame, *, names: Iterable[str] = (), index: bool = False, **options: Any) -> str:
    """`frame.to_markdown` with the columns in `names` (class, file, recipe names), every header and the index
    escaped; other cells (numbers, formatted figures) as they are."""
    shown = frame.copy()
    for column in names:
        shown[column] = shown[column].map(escape_markdown)
    shown.columns = [escape_markdown(c) for c in shown.columns]
    if index:
        shown.index = [escape_markdown(i) for i in shown.index]
    return str(shown.to_markdown(index=index, **options))


def markdown_link(text: Any, target: str) -> str:
    """A link whose text is escaped and whose target is percent-encoded (spaces, parentheses, '<' and all)."""
    return f"[{escape_markdown(text)}]({quote(str(target), safe='/')})"
