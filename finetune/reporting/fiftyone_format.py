"""The queue as a FiftyOne image classification dataset (`fiftyone.types.FiftyOneImageClassificationDataset`):

    fiftyone/
        data/<uuid>.<ext>     the queued images (hard links where the disk allows, else copies)
        labels.json           {"classes": [...], "labels": {"<uuid>": null, ...}}: unlabelled, for a person to label
        suggestions.json      the same layout, each image's suggested class index (the model's answer)

A uuid is the image's file name without its extension ('-2', '-3', ... appended when two queued images share one), as
FiftyOne's exporter names files; a target is an index into `classes` (null: not labelled yet). The suggestions are kept
out of labels.json on purpose: a label read back is trusted as a person's, and the queue holds the model's likeliest
mistakes. Load them beside it with `labels_path="suggestions.json", label_field="suggestion"`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from finetune.files import write_text

LABELS = "labels.json"
SUGGESTIONS = "suggestions.json"
DATA = "data"


def unique_stem(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... when it is taken (FiftyOne's exporter's rule for name clashes)."""
    name, count = stem, 1
    while name in taken:
        count += 1
        name = f"{stem}-{count}"
    taken.add(name)
    return name


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no extra space), or a copy where the two paths are on different disks or links are refused."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_fiftyone_dataset(folder: Path, queue: pd.DataFrame, class_names: list[str]) -> dict[str, str]:
    """The queue (path, suggested_label) as a FiftyOne classification dataset in `folder`; returns {uuid: source path}."""
    data = folder / DATA
    data.mkdir(parents=True)
    taken: set[str] = set()
    sources: dict[str, str] = {}
    suggested: dict[str, int] = {}
    for row in queue.itertuples():
        source = Path(str(row.path))
        uuid = unique_stem(source.stem, taken)
        link_or_copy(source, data / f"{uuid}{source.suffix}")
        sources[uuid] = str(source)
        suggested[uuid] = class_names.index(str(row.suggested_label))
    write_text(folder / LABELS, json.dumps({"classes": class_names, "labels": dict.fromkeys(sources)}, indent=1))
    write_text(folder / SUGGESTIONS, json.dumps({"classes": class_names, "labels": suggested}, indent=1))
    return sources
