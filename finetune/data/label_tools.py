"""Read what labelling tools export, as (path, label) rows for the manifest path: a Label Studio JSON export and a
FiftyOne image classification dataset folder. One label per image.

**Label Studio** ("JSON" export: a list of tasks). A task's label is the `choices` result of its annotations; the
prediction `finetune label` wrote is a suggestion and never read. A task without an annotation, or whose annotations
were all cancelled ("skipped"), is left out and counted in a warning (a queue is often labelled in part); if no task is
left the file is refused. Annotations of one task that disagree are refused, unless one is marked ground truth; one
annotation with several choices is refused (one label per image). A task's image is, in this order:
1. `data.path`, the local path `finetune label` writes into every task (Label Studio keeps a task's data as given);
2. `data.image` as a local-files URL `/data/local-files/?d=REL`: the file `/REL` (document root `/`, as `finetune
   label` suggests), else `REL` under the JSON file's folder (document root = that folder);
3. `data.image` as a plain path: absolute, or relative to the JSON file's folder.
An image found none of these ways (an upload under `/data/upload/`, an http URL) is refused, naming the task.

**FiftyOne** (`fiftyone.types.FiftyOneImageClassificationDataset`): a folder with `labels.json` =
`{"classes": [...], "labels": {"<uuid>": target}}` and `data/<uuid>.<ext>` (or `data.json`, {uuid: path}, when the
media were not exported). A target is an index into `classes`, a label name when there are no classes, a
`{"label": ...}` object, or null (not labelled: left out and counted, like an unannotated task). A key that is an
absolute path (an export with `abs_paths=True`) names the image itself.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pandas as pd

from finetune.errors import DataError

log = logging.getLogger(__name__)
LOCAL_FILES = "/data/local-files/?d="
FIFTYONE_LABELS = "labels.json"
LABEL_STUDIO_HINT = "export the project from Label Studio as 'JSON' (a list of tasks with annotations)"


def is_tool_export(path: Path) -> bool:
    """Whether `path` is a labelling tool's export finetune reads: a .json file or a folder holding labels.json."""
    return (path.suffix.lower() == ".json" and path.is_file()) or (path.is_dir() and (path / FIFTYONE_LABELS).is_file())


def read_tool_export(path: Path) -> pd.DataFrame:
    """(path, label) rows of a Label Studio JSON export or a FiftyOne classification dataset folder. The paths are
    absolute: each was found from the working folder (a task's `data.path`, `queue/fiftyone/data/...`), and a
    manifest's relative paths would be read from the export's own folder instead."""
    rows = read_fiftyone(path) if path.is_dir() else read_label_studio(path)
    rows["path"] = [os.path.abspath(p) for p in rows["path"]]
    return rows


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{what} {path} is not readable JSON ({' '.join(str(exc).split())}); pass the file the tool exported"
        ) from None


def read_label_studio(path: Path) -> pd.DataFrame:
    """The labelled tasks of a Label Studio JSON export (see the module's docstring for the rules)."""
    tasks = _load_json(path, "Label Studio export")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise DataError(f"{path} is no Label Studio JSON export (a list of tasks, each with 'data'); {LABEL_STUDIO_HINT}")
    rows: list[tuple[str, str]] = []
    unlabelled = cancelled = 0
    for number, task in enumerate(tasks, start=1):
        name = f"task {task.get('id', f'#{number}')}"
        annotations = [a for a in task.get("annotations", task.get("completions", [])) if isinstance(a, dict)]
        live = [a for a in annotations if not a.get("was_cancelled")]
        label = _task_label(path, name, live)
        if label is None:
            cancelled += bool(annotations) and not live
            unlabelled += not (annotations and not live)
            continue
        rows.append((_task_image(path, name, task["data"]), label))
    if unlabelled or cancelled:
        log.warning(
            "%s: %d task(s) without an annotation and %d with every annotation cancelled are left out; %d read",
            path,
            unlabelled,
            cancelled,
            len(rows),
        )
    if not rows:
        raise DataError(
            f"{path}: none of its {len(tasks)} task(s) has a label; label some in Label Studio, then {LABEL_STUDIO_HINT}"
        )
    return pd.DataFrame(rows, columns=["path", "label"])


def _choices(path: Path, name: str, annotation: dict[str, Any]) -> list[str]:
    picked = [
        str(choice)
        for result in annotation.get("result") or []
        if isinstance(result, dict) and result.get("type") == "choices"
        for choice in (result.get("value") or {}).get("choices") or []
    ]
    if len(picked) > 1:
        raise DataError(
            f"{path}: {name} has {len(picked)} choices in one annotation ({', '.join(picked)}); finetune reads one label "
            'per image: keep one choice (Choices choice="single") and export again'
        )
    return picked


def _task_label(path: Path, name: str, annotations: list[dict[str, Any]]) -> str | None:
    """The one label of a task's annotations (ground truth first), None when none holds a choice."""
    trusted = [a for a in annotations if a.get("ground_truth")] or annotations
    labels = sorted({c for a in trusted for c in _choices(path, name, a)})
    if len(labels) > 1:
        raise DataError(
            f"{path}: {name} has annotations that disagree ({', '.join(labels)}); keep one, or mark one as ground "
            "truth in Label Studio, and export again"
        )
    return labels[0] if labels else None


def _task_image(path: Path, name: str, data: dict[str, Any]) -> str:
    base = path.parent
    image = str(data.get("image", ""))
    tried = [str(data["path"])] if data.get("path") else []
    if image.startswith(LOCAL_FILES):
        relative = unquote(image[len(LOCAL_FILES) :]).lstrip("/")
        tried += ["/" + relative, str(base / relative)]
    elif image and "://" not in image and not image.startswith("/data/"):
        tried.append(image if os.path.isabs(image) else str(base / image))
    found = next((p for p in tried if Path(p).is_file()), None)
    if found is None:
        where = f" (looked at {', '.join(tried)})" if tried else ""
        raise DataError(
            f"{path}: {name}: image '{image or data}' not found{where}; keep the 'path' field finetune label writes into "
            "each task, or serve images through local-files with document root / (or the JSON file's folder)"
        )
    return found


def read_fiftyone(folder: Path) -> pd.DataFrame:
    """The labelled images of a FiftyOne image classification dataset folder (see the module's docstring)."""
    payload = _load_json(folder / FIFTYONE_LABELS, "FiftyOne labels")
    layout = f'{folder} is no FiftyOne image classification dataset: labels.json must be {{"classes": [...], "labels": {{uuid: target}}}}'
    if not isinstance(payload, dict) or not isinstance(payload.get("labels"), dict):
        raise DataError(layout + "; export it with dataset_type=fo.types.FiftyOneImageClassificationDataset")
    classes = payload.get("classes")
    if classes is not None and not isinstance(classes, list):
        raise DataError(layout + f"; its 'classes' is a {type(classes).__name__}, not a list")
    media = _fiftyone_media(folder)
    rows: list[tuple[str, str]] = []
    unlabelled = 0
    for uuid, target in payload["labels"].items():
        label = _fiftyone_label(folder, uuid, target, classes)
        if label is None:
            unlabelled += 1
            continue
        image = uuid if os.path.isabs(uuid) and Path(uuid).is_file() else media.get(os.path.normpath(uuid))
        if image is None:
            raise DataError(
                f"{folder}: image '{uuid}' of labels.json has no file in {folder / 'data'} (a file named {uuid}.<ext>); "
                "export the dataset again with its media, or remove the entry"
            )
        rows.append((image, label))
    if unlabelled:
        log.warning("%s: %d image(s) without a label (null) are left out; %d read", folder, unlabelled, len(rows))
    if not rows:
        raise DataError(f"{folder}: none of its {len(payload['labels'])} image(s) has a label in labels.json; label some first")
    return pd.DataFrame(rows, columns=["path", "label"])


def _fiftyone_media(folder: Path) -> dict[str, str]:
    """{uuid: image path}: the files below data/ by their path without extension, or data.json's map."""
    data = folder / "data"
    if data.is_dir():
        return {
            os.path.normpath(str(p.relative_to(data).with_suffix(""))): str(p)
            for p in sorted(data.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
    manifest = folder / "data.json"
    if manifest.is_file():
        listed = _load_json(manifest, "FiftyOne data manifest")
        if isinstance(listed, dict):
            return {os.path.normpath(k): str(v if os.path.isabs(str(v)) else folder / str(v)) for k, v in listed.items()}
    return {}


def _fiftyone_label(folder: Path, uuid: str, target: Any, classes: list[Any] | None) -> str | None:
    if isinstance(target, dict):
        target = target.get("label")
    if target is None:
        return None
    if isinstance(target, list):
        raise DataError(
            f"{folder}: image '{uuid}' has {len(target)} labels (Classifications); finetune reads one label per image"
        )
    if isinstance(target, int) and not isinstance(target, bool):
        if classes is None or not 0 <= target < len(classes):
            known = f"{len(classes)} classes" if classes is not None else "no 'classes' list"
            raise DataError(f"{folder}: image '{uuid}' has class index {target} but labels.json has {known}; export it again")
        return str(classes[target])
    if isinstance(target, str) and target.strip():
        return target
    raise DataError(f"{folder}: image '{uuid}' has target {target!r}; expected a class index, a class name or null")
