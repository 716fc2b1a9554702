"""`finetune merge-labels`: one manifest for the next `train` from a run's labelled data, the pseudo-labels `finetune
label` accepted and the labels a person added (CSV manifest, Label Studio JSON export, FiftyOne folder).

Every row gets an explicit `split` so the run's val and test images keep theirs (the next run is judged on the same
untouched test images) and pseudo-labels and new labels go to train only; `source` says where each row came from
(`labelled`, `new`, `pseudo`). The manifest reader honours `split` and ignores the other columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from finetune.config.catalog import IMAGE_EXTENSIONS
from finetune.data.doctor import examine_all
from finetune.data.facts import FactsCache
from finetune.data.label_tools import is_tool_export
from finetune.data.scan import read_manifest, read_tool_manifest, scan_image_folder
from finetune.errors import DataError, UsageError
from finetune.files import check_writable_file, guarded, path_key, read_text_table, write_table
from finetune.run_dir import RunDir, check_destination_file

log = logging.getLogger(__name__)
MERGED_COLUMNS = ["path", "label", "split", "source", "confidence"]
KEPT_SPLITS = ("val", "test")  # the run's images whose split and label a merge never changes


@dataclass
class MergeResult:
    manifest: Path
    rows: pd.DataFrame  # path, label, split, source, confidence: what the manifest holds
    counts: dict[str, int]  # rows per source, and what was dropped or replaced


def merge_labels(
    *,
    run: str | Path,
    out: str | Path,
    pseudo_labels: str | Path | None = None,
    labelled: Sequence[str | Path] = (),
    progress: bool = True,
) -> MergeResult:
    """Write to `out` (a CSV) the run's splits.csv rows, the new labels of `labelled` (CSV manifests, Label Studio
    JSON exports, FiftyOne folders or class folders) and the rows of `pseudo_labels` (label's pseudo_labels.csv, or
    the folder holding it), new labels and pseudo-labels in train. A new label that contradicts the run's val or test
    label of the same image (same file or same bytes) is refused; one that contradicts a train label replaces it; a
    pseudo-label of an image that has a label is dropped."""
    out = Path(out)
    check_writable_file(out, what="--out", example="merged.csv")
    check_destination_file(out, what="--out")
    base = _run_rows(Path(run))
    new = _new_rows(labelled)
    pseudo = _pseudo_rows(Path(pseudo_labels)) if pseudo_labels is not None else _empty()
    base, new, replaced = _apply_new(base, new, progress=progress)
    known = {path_key(p) for p in pd.concat([base["path"], new["path"]])}
    taken = pseudo["path"].map(path_key).isin(known)
    rows = pd.concat([base, new, pseudo[~taken]], ignore_index=True)[MERGED_COLUMNS]
    counts = {
        "labelled": int((rows["source"] == "labelled").sum()),
        "new": int((rows["source"] == "new").sum()),
        "pseudo": int((~taken).sum()),
        "pseudo_dropped_already_labelled": int(taken.sum()),
        "train_labels_replaced": replaced,
        **{f"{split}_images": int((rows["split"] == split).sum()) for split in ("train", "val", "test")},
    }
    with guarded(out, atomic=True):
        write_table(rows, out, float_format="%.6f")
    log.debug("merged manifest %s: %s", out, counts)  # the command prints it
    return MergeResult(out, rows, counts)


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=MERGED_COLUMNS)


def _run_rows(run: Path) -> pd.DataFrame:
    """The run's own labelled images with the split they had (splits.csv)."""
    splits = RunDir(run).splits
    if not splits.is_file():
        raise UsageError(f"{run} has no splits.csv; pass the run folder that `finetune train` wrote (not a checkpoint)")
    table = read_text_table(splits)
    return table[["path", "label", "split"]].assign(source="labelled", confidence="")


def _new_rows(labelled: Sequence[str | Path]) -> pd.DataFrame:
    """The new labels, each file read as --data reads it, all in train; the last file wins for an image in several
    (the same file, or the same bytes under another name)."""
    frames = []
    for item in labelled:
        path = Path(item)
        if is_tool_export(path):
            rows = read_tool_manifest(path)
        elif path.suffix.lower() == ".csv" and path.is_file():
            rows = read_manifest(path)
        elif path.is_dir():
            rows = scan_image_folder(path, extensions=IMAGE_EXTENSIONS)
        else:
            raise UsageError(
                f"--labelled {path}: not a CSV manifest, Label Studio JSON export, FiftyOne folder or image folder; check the path"
            )
        frames.append(rows[["path", "label"]])
    if not frames:
        return _empty()
    new = pd.concat(frames, ignore_index=True)
    new = new[~new["path"].map(path_key).duplicated(keep="last")]
    # one picture labelled in two tools (the pool's file and FiftyOne's hard link or copy of it) trains once
    facts = examine_all(list(new["path"]), progress=False, cache=FactsCache.default())
    same_bytes = pd.Series([f.sha256 or path_key(p) for f, p in zip(facts, new["path"])], index=new.index)
    new = new[~same_bytes.duplicated(keep="last")]
    return new.assign(split="train", source="new", confidence="").reset_index(drop=True)


def _pseudo_rows(path: Path) -> pd.DataFrame:
    """label's accepted pseudo-labels (path, label, confidence), for train."""
    file = path / "pseudo_labels.csv" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"--pseudo-labels {path}: no pseudo_labels.csv there; pass the folder `finetune label --out` wrote")
    table = read_text_table(file)
    missing = {"path", "label", "confidence"} - set(table.columns)
    if missing:
        raise DataError(f"{file} lacks column(s) {sorted(missing)}; pass the pseudo_labels.csv `finetune label` wrote")
    return table[["path", "label", "confidence"]].assign(split="train", source="pseudo")


def _apply_new(base: pd.DataFrame, new: pd.DataFrame, *, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The run's rows and the new ones, one row per image: a new label contradicting a val/test label refused, one
    agreeing with it kept in its split; a train image's new label replaces its old one."""
    if new.empty:
        return base, new, 0
    new = new.copy()
    same = _same_images(base, new, progress=progress)
    replaced = 0
    drop = []
    for new_index, base_index in same:
        old, fresh = base.loc[base_index], new.loc[new_index]
        if old["split"] in KEPT_SPLITS:
            if old["label"] != fresh["label"]:
                raise DataError(
                    f"new label '{fresh['label']}' for {fresh['path']}, which is the run's {old['split']} image "
                    f"{old['path']} labelled '{old['label']}'; a merge never changes val or test labels: fix it in the "
                    "run's data and retrain, or drop it from the new labels"
                )
            new.loc[new_index, ["split", "source"]] = [old["split"], "labelled"]  # the same label: it keeps its split
            drop.append(base_index)
            continue
        replaced += int(old["label"] != fresh["label"])
        drop.append(base_index)
    return base.drop(index=drop), new, replaced


def _same_images(base: pd.DataFrame, new: pd.DataFrame, *, progress: bool) -> list[tuple[int, int]]:
    """(new row, run row) pairs that are one image: the same file (real path) or the same bytes (a copy or hard link,
    as in a FiftyOne folder's data/)."""
    by_path = {path_key(p): i for i, p in zip(base.index, base["path"])}
    pairs = {n: by_path[path_key(p)] for n, p in zip(new.index, new["path"]) if path_key(p) in by_path}
    rest = [n for n in new.index if n not in pairs]
    if rest:
        paths = [new.at[n, "path"] for n in rest] + list(base["path"])
        facts = examine_all(paths, progress=progress, cache=FactsCache.default())
        digests = [f.sha256 for f in facts]
        by_bytes = {d: i for d, i in zip(digests[len(rest) :], base.index) if d}
        pairs |= {n: by_bytes[d] for n, d in zip(rest, digests) if d in by_bytes}
    return sorted(pairs.items())
