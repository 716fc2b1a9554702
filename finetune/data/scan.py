"""Find the images: a folder of class folders (flat or split into train/val/test) or a CSV manifest."""

from __future__ import annotations

import logging
import os
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from finetune.config.schema import DataConfig
from finetune.data.label_tools import is_tool_export, read_tool_export
from finetune.data.members import is_shard_folder
from finetune.errors import DataError
from finetune.files import read_text_table

log = logging.getLogger(__name__)

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
# Folders that operating systems and NAS boxes drop into shared folders: never classes.
OS_METADATA_DIRS = frozenset({"__macosx", "@eadir", "$recycle.bin", "system volume information", "lost+found", ".trashes"})
SAMPLE_COLUMNS = ["path", "label", "split"]
LABEL_SEPARATOR = "|"  # between the names of a multi-label manifest's `labels` cell: dog|cat
WRONG_SEPARATORS = (",", ";", "\t", "/")  # what people type instead of |: refused rather than read as one name
MULTI_COLUMN = "labels"


def class_folders(folder: Path) -> list[Path]:
    """Sub-folders that can hold images (classes or splits): not hidden, not OS metadata."""
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name.lower() not in OS_METADATA_DIRS
    )


def split_folders(root: Path) -> dict[Path, str] | None:
    """{folder: split} when `root` is split into train/val/test folders (any capitalisation), None when flat.

    A folder that mixes split folders with other folders is ambiguous and refused.
    """
    subdirs = class_folders(root)
    named = {p: SPLIT_NAMES[p.name.lower()] for p in subdirs if p.name.lower() in SPLIT_NAMES}
    if not named:
        return None
    others = [p.name for p in subdirs if p not in named]
    if others:
        raise DataError(
            f"{root} mixes split folders ({', '.join(sorted(p.name for p in named))}) with other folders "
            f"({', '.join(others[:3])}); put every class folder inside train/ val/ [test/], or use a flat folder of classes"
        )
    return named


def list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files below `folder` (recursive; hidden files and folders skipped), in sorted order."""
    found = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if path.suffix.lower() in extensions and not any(part.startswith(".") for part in parts) and path.is_file():
            found.append(path)
    return sorted(found)


def _scan_classes(folder: Path, extensions: Sequence[str]) -> pd.DataFrame:
    rows = [(str(path), class_dir.name) for class_dir in class_folders(folder) for path in list_images(class_dir, extensions)]
    return pd.DataFrame(rows, columns=["path", "label"])


def scan_image_folder(root: Path, *, extensions: Sequence[str]) -> pd.DataFrame:
    """Rows of (path, label, split); split is empty for a flat folder of class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; give a folder of class sub-folders (or a CSV manifest)")
    if is_shard_folder(root):
        raise DataError(
            f"{root} is a shard folder (finetune shard): train, lr-find and eval read it, this command needs the image "
            "files; give the folder or manifest the shards were written from (shards.json names it as 'source')"
        )
    splits = split_folders(root)
    if splits is None:
        samples = _scan_classes(root, extensions).assign(split="")
    else:
        frames = [_scan_classes(folder, extensions).assign(split=split) for folder, split in splits.items()]
        samples = pd.concat(frames, ignore_index=True)
    if samples.empty:
        raise DataError(
            f"no images found in {root}; expected class sub-folders (or train/ val/ holding them) "
            f"with files ending in {', '.join(extensions)}"
        )
    return samples[SAMPLE_COLUMNS]


def _read_csv_rows(path: Path) -> pd.DataFrame:
    with open(path, "rb") as handle:
        if b"\x00" in handle.read(8192):
            raise DataError(
                f"manifest {path} is not a readable CSV: it holds binary data; pass a text file with a 'path,label' header"
            )
    try:
        frame = read_text_table(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"manifest {path} is not a readable CSV: {' '.join(str(exc).split())}") from None
    if {"label", MULTI_COLUMN} <= set(frame.columns):
        raise DataError(
            f"manifest {path} has both a 'label' and a 'labels' column; keep 'label' for one class per image or "
            "'labels' (names joined by |) for several"
        )
    missing = {"path", "label"} - set(frame.columns.str.replace(MULTI_COLUMN, "label"))
    if missing:
        raise DataError(
            f"manifest {path} lacks column(s) {sorted(missing)}; it needs a header line 'path,label' "
            "(or 'path,labels' for several labels per image)"
        )
    if frame.empty:
        raise DataError(f"manifest {path} has a header but no rows; add one line per image: path,label")
    return frame


def _manifest_splits(path: Path, values: pd.Series) -> list[str]:
    """Each row's split: train/val/test under any common spelling, or '' to let finetune split."""
    unknown = sorted({v for v in values if v.strip() and v.strip().lower() not in SPLIT_NAMES})
    if unknown:
        raise DataError(f"manifest {path}: unknown split value(s) {unknown[:3]}; use train, val or test (or leave it empty)")
    return [SPLIT_NAMES[v.strip().lower()] if v.strip() else "" for v in values]


def split_labels(cell: str) -> list[str]:
    """The label names of a multi-label cell as stored ('cat|dog' -> ['cat', 'dog']; '' -> [])."""
    return cell.split(LABEL_SEPARATOR) if cell else []


def _label_set(path: Path, line: int, cell: str) -> str:
    """One `labels` cell as its canonical form: the names, stripped, unique and sorted, joined by |."""
    text = str(cell).strip()
    names = [n.strip() for n in text.split(LABEL_SEPARATOR)] if text else []
    if any(not n for n in names):
        raise DataError(
            f"manifest {path} line {line}: labels '{text}' has an empty name between | separators; "
            "join names with single | (dog|cat), or leave the cell empty for an image with none"
        )
    wrong = next((sep for n in names for sep in WRONG_SEPARATORS if sep in n), None)
    if wrong is not None:
        raise DataError(
            f"manifest {path} line {line}: labels '{text}' separates names with {wrong!r}; separate label names with | (dog|cat)"
        )
    return LABEL_SEPARATOR.join(sorted(set(names)))


def _read_multilabel(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """A manifest's `labels` column, each cell made canonical in `label`; a path listed twice is refused."""
    frame["label"] = [_label_set(path, line, cell) for line, cell in enumerate(frame[MULTI_COLUMN], start=2)]
    return frame


def _refuse_repeats(path: Path, frame: pd.DataFrame, keys: pd.Series) -> None:
    """Several labels per image: a file on two lines (however its path is spelled) is refused, labels equal or not."""
    repeated = frame.index[keys.duplicated(keep=False)]
    if len(repeated):
        first = keys[repeated[0]]
        lines = [str(i + 2) for i in repeated[keys[repeated] == first]]
        raise DataError(
            f"manifest {path}: {frame.at[repeated[0], 'path']} is listed {len(lines)} times (lines {', '.join(lines)}); "
            "keep one line per image with all its labels joined by | (dog|cat)"
        )


def manifest_is_multilabel(cfg: DataConfig) -> bool:
    """Whether the data has several labels per image: a manifest with a `labels` column (or data.task says so)."""
    path = Path(cfg.path) if cfg.path is not None else None
    columns: list[str] = []
    if path is not None and path.suffix.lower() == ".csv" and path.is_file():
        columns = [str(c) for c in _read_csv_rows(path).columns]
    multi = MULTI_COLUMN in columns
    if cfg.task == "multilabel" and not multi:
        raise DataError(
            f"data.task is multilabel but {path} is no manifest with a 'labels' column; give a CSV 'path,labels' "
            "with names joined by | (dog|cat)"
        )
    if cfg.task == "single_label" and multi:
        raise DataError(
            f"data.task is single_label but manifest {path} has a 'labels' column; rename it 'label' (one class per "
            "image) or set data.task: multilabel"
        )
    return multi


def read_manifest(path: Path) -> pd.DataFrame:
    """A CSV with columns path,label (optional split); relative paths are relative to the CSV.

    With a `labels` column instead (names joined by |, an empty cell for none), each image's names are kept
    joined in `label`, sorted ('cat|dog')."""
    frame = _read_csv_rows(path)
    if MULTI_COLUMN in frame.columns:
        frame = _read_multilabel(path, frame)
    blank = frame.index[frame["label"].str.strip() == ""] if MULTI_COLUMN not in frame.columns else frame.index[:0]
    if len(blank):
        raise DataError(
            f"manifest {path} line {blank[0] + 2}: empty label for {frame.at[blank[0], 'path']}; give every image a class"
        )
    return manifest_rows(path, frame)


def read_tool_manifest(path: Path) -> pd.DataFrame:
    """A Label Studio JSON export or a FiftyOne classification dataset folder (finetune/data/label_tools.py) as the
    rows of a manifest, checked as a CSV manifest's are (one file under two labels, missing files)."""
    return manifest_rows(path, read_tool_export(path))


def manifest_rows(path: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """The (path, label, split) rows of a manifest read into `frame`: paths made absolute (relative to the manifest's
    folder), a file under two labels refused, the split column read, missing files refused, repeats dropped."""
    base = Path(path).parent
    frame["path"] = [str(p if Path(p).is_absolute() else base / p) for p in frame["path"]]
    keys = frame["path"].map(file_key)
    if MULTI_COLUMN in frame.columns:
        _refuse_repeats(path, frame, keys)
    twice = frame.groupby(keys)["label"].nunique()
    if (twice > 1).any():
        rows = frame[keys == twice[twice > 1].index[0]]
        labels, spellings = sorted(rows["label"].unique()), list(dict.fromkeys(rows["path"]))
        also = f" (also written {', '.join(spellings[1:3])})" if len(spellings) > 1 else ""
        raise DataError(
            f"manifest {path}: {spellings[0]}{also} is listed under {len(labels)} labels ({', '.join(labels)}); "
            "keep one line per image"
        )
    frame["split"] = _manifest_splits(path, frame["split"]) if "split" in frame.columns else ""
    absent = [p for p in frame["path"] if not Path(p).is_file()]
    if absent:
        raise DataError(f"manifest {path} names {len(absent)} missing file(s), first: {absent[0]}")
    return frame[~keys.duplicated()][SAMPLE_COLUMNS]


def file_key(path: str | Path) -> str:
    """What two spellings of one file share (relative or absolute, with '..', through a symlink): its real path."""
    return os.path.normcase(os.path.realpath(path))


def read_samples(cfg: DataConfig) -> pd.DataFrame:
    """Every (path, label, split) row of the folder, CSV manifest, Label Studio JSON export or FiftyOne dataset folder
    named by `cfg.path`."""
    if cfg.path is None:
        raise DataError("no data given; pass --data PATH (a folder of class folders or a CSV manifest) or set data.path")
    path = Path(cfg.path)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist; check --data")
        samples = read_manifest(path)
    elif is_tool_export(path):
        samples = read_tool_manifest(path)
    elif path.suffix.lower() == ".json":
        raise DataError(f"{path} does not exist; check --data (a Label Studio JSON export, a folder or a CSV manifest)")
    else:
        samples = scan_image_folder(path, extensions=cfg.extensions)
    names = [n for cell in samples["label"] for n in split_labels(cell)] if manifest_is_multilabel(cfg) else samples["label"]
    check_label_spellings(names, source=path)
    return samples


def check_label_spellings(labels: Iterable[str], *, source: Path | str) -> None:
    """Two class names that are one name in another Unicode normalisation ('café' typed on macOS (NFD) and on
    Linux (NFC)) look equal everywhere but are two classes: refuse them up front, naming both spellings."""
    seen: dict[str, str] = {}
    for label in dict.fromkeys(str(x) for x in labels):
        key = unicodedata.normalize("NFC", label)
        other = seen.setdefault(key, label)
        if other != label:
            raise DataError(
                f"{source}: class names {ascii(other)} and {ascii(label)} are both '{key}' written in two Unicode forms "
                "(NFC and NFD); rename one folder or label so they are one class (or two clearly different names)"
            )


def read_path_list(path: Path) -> list[str]:
    """The image paths of a CSV with a 'path' column (other columns, a label included, are ignored); relative paths
    are relative to the CSV."""
    try:
        frame = read_text_table(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"manifest {path} is not a readable CSV: {' '.join(str(exc).split())}") from None
    if "path" not in frame.columns:
        raise DataError(f"manifest {path} lacks a 'path' column; it needs a header line 'path' and one image per line")
    base = Path(path).parent
    written = [str(p if Path(p).is_absolute() else base / p) for p in frame["path"] if str(p).strip()]
    first: dict[str, str] = {}
    for item in written:  # each file once, however often and however spelled, under its first spelling
        first.setdefault(file_key(item), item)
    paths = list(first.values())
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        raise DataError(f"manifest {path} names {len(absent)} missing file(s), first: {absent[0]}")
    if not paths:
        raise DataError(f"manifest {path} has a header but no rows; add one line per image")
    return paths
