"""A folder of WebDataset shards: `{split}-%06d.tar` files of screened, split images, with `shards.json` (classes, split
sizes, every shard's count and sha256) and `samples.csv` (one row per image: member, label, split, source file).

An image inside a shard has a path of its own, `DIR/val-000000.tar::000000012.jpg` (`member_path`), that
`finetune.data.decode.load_image` reads: the report, calibration, Grad-CAM and eval read val/test images through it,
in order, exactly as they read files. Training streams the train shards instead (`finetune.data.stream`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import webdataset as wds
from tqdm.auto import tqdm

from finetune.data.members import MANIFEST, is_shard_folder, member_path
from finetune.data.split import SPLIT_ORDER, DatasetIndex
from finetune.errors import DataError
from finetune.files import read_text_table, write_table, write_text

log = logging.getLogger(__name__)

SAMPLES = "samples.csv"
SKIPPED = "skipped.csv"
LEAKAGE = "leakage.csv"
FORMAT = "finetune-shards"
FORMAT_VERSION = 1
SHARD_PATTERN = "{split}-%06d.tar"
HASH_CHUNK = 2**20
SHARD_MTIME = 946_684_800  # 2000-01-01: every member's modification time, fixed so shards are reproducible


@dataclass(frozen=True)
class ShardFile:
    """One tar file of a split: its name in the folder, how many images it holds, its size and sha256."""

    name: str
    split: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    """A shard folder as shards.json describes it."""

    root: Path
    classes: list[str]
    shards: list[ShardFile]
    meta: dict[str, Any]

    def of_split(self, split: str) -> list[ShardFile]:
        return [s for s in self.shards if s.split == split]

    def paths(self, split: str) -> list[str]:
        return [str(self.root / s.name) for s in self.of_split(split)]

    def count(self, split: str) -> int:
        return sum(s.count for s in self.of_split(split))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bad_folder(folder: Path, problem: str) -> DataError:
    return DataError(f"{folder} is not a usable shard folder: {problem}; write it with 'finetune shard IMAGES --out {folder}'")


def read_shard_set(folder: str | Path, *, verify: bool = True, progress: bool = False) -> ShardSet:
    """shards.json of `folder`, every shard present with its size; with `verify`, every shard's sha256 checked too
    (one read of every byte: what screening a folder costs in file reads, without the decoding)."""
    root = Path(folder)
    if not is_shard_folder(root):
        raise DataError(f"{root} holds no {MANIFEST}: it is no shard folder; write one with 'finetune shard IMAGES --out DIR'")
    try:
        meta = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        shards = [ShardFile(**entry) for entry in meta.pop("shards")]
        classes = [str(c) for c in meta.pop("classes")]
    except (ValueError, KeyError, TypeError) as exc:
        raise _bad_folder(root, f"{MANIFEST} is not readable ({exc})") from None
    if meta.get("format") != FORMAT:
        raise _bad_folder(root, f"{MANIFEST} is not a finetune shard manifest (format {meta.get('format')!r})")
    for shard in tqdm(shards, desc="verify shards", unit="shard", disable=not (progress and verify)):
        path = root / shard.name
        if not path.is_file():
            raise _bad_folder(root, f"shard {shard.name} listed in {MANIFEST} is missing")
        if path.stat().st_size != shard.bytes:
            raise _bad_folder(root, f"shard {shard.name} has {path.stat().st_size} bytes, {MANIFEST} says {shard.bytes}")
        if verify and file_sha256(path) != shard.sha256:
            raise _bad_folder(root, f"shard {shard.name} does not match its sha256 in {MANIFEST} (changed or corrupted)")
    return ShardSet(root=root, classes=classes, shards=shards, meta=meta)


def shard_index(shards: ShardSet) -> DatasetIndex:
    """The DatasetIndex of a shard folder: one row per image, its path a member path, in the order written."""
    samples = read_text_table(shards.root / SAMPLES)
    samples = samples.assign(path=[member_path(shards.root / tar, m) for tar, m in zip(samples["shard"], samples["member"])])
    return DatasetIndex(samples=samples[["path", "label", "split"]], class_names=shards.classes)


def screening_outcome(shards: ShardSet) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(skipped, leaks) as screening found them while the shards were written."""
    skipped = read_text_table(shards.root / SKIPPED)
    leaks = read_text_table(shards.root / LEAKAGE) if (shards.root / LEAKAGE).is_file() else pd.DataFrame()
    return skipped, leaks


def _sample(key: str, path: str, label: str, cls: int) -> dict[str, Any]:
    """One WebDataset sample: the image's bytes as stored under its own extension, its class index and a json record."""
    ext = Path(path).suffix.lower().lstrip(".") or "img"
    record = json.dumps({"path": path, "label": label}).encode("utf-8")
    return {"__key__": key, ext: Path(path).read_bytes(), "cls": str(cls).encode("ascii"), "json": record}


def _write_split(
    out: Path, split: str, rows: pd.DataFrame, classes: list[str], shard_size: int, bar: Any
) -> list[dict[str, Any]]:
    """The shards of one split; each row gets its (shard, member) in `rows`' order."""
    lookup = {name: i for i, name in enumerate(classes)}
    counts: dict[str, int] = {}
    members: list[tuple[str, str]] = []
    pattern = str(out / SHARD_PATTERN.format(split=split))
    # bytes as they are (no encoder); a whole-second mtime: no PAX header per member (Python's tarfile writes one for a
    # float mtime, and parsing it tripled the cost of reading a shard), and the same images give byte-identical shards
    with wds.ShardWriter(
        pattern, maxcount=shard_size, maxsize=float("inf"), verbose=0, encoder=False, mtime=SHARD_MTIME
    ) as writer:
        for position, (path, label) in enumerate(zip(rows["path"], rows["label"])):
            key = f"{split}{position:09d}"
            sample = _sample(key, str(path), str(label), lookup[label])
            writer.write(sample)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
            members.append((name, f"{key}.{next(k for k in sample if not k.startswith('_') and k not in ('cls', 'json'))}"))
            bar.update(1)
    rows["shard"], rows["member"] = [m[0] for m in members], [m[1] for m in members]
    return [{"name": name, "split": split, "count": n} for name, n in counts.items()]


def write_shards(
    index: DatasetIndex,
    out: Path,
    *,
    shard_size: int,
    skipped: pd.DataFrame,
    leaks: pd.DataFrame,
    meta: dict[str, Any],
    progress: bool = True,
    hasher: Callable[[Path], str] = file_sha256,
) -> ShardSet:
    """Write every split of `index` as shards of `shard_size` images into `out`, then samples.csv, the screening
    outcome and shards.json last (its presence marks a finished folder)."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    tables = []
    with tqdm(total=len(index.samples), desc="write shards", unit="img", disable=not progress) as bar:
        for split in SPLIT_ORDER:
            rows = index.split(split)
            if len(rows):
                written += _write_split(out, split, rows, index.class_names, shard_size, bar)
                tables.append(rows)
    samples = pd.concat(tables, ignore_index=True).rename(columns={"path": "source"})
    write_table(samples[["shard", "member", "label", "split", "source"]], out / SAMPLES)
    write_table(skipped, out / SKIPPED)
    if len(leaks):
        write_table(leaks, out / LEAKAGE)
    for entry in written:
        path = out / entry["name"]
        entry |= {"bytes": path.stat().st_size, "sha256": hasher(path)}
    splits = {split: int((index.samples["split"] == split).sum()) for split in SPLIT_ORDER}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "classes": index.class_names}
    manifest |= {"splits": splits, "skipped": len(skipped), "shard_size": shard_size, "shards": written}
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return read_shard_set(out, verify=False)


def decode_sample(sample: dict[str, Any]) -> tuple[bytes, int, str]:
    """(image bytes, class index, key) of a sample as `tarfile_to_samples` reads it back."""
    image = next((v for k, v in sample.items() if not k.startswith("_") and k not in ("cls", "json")), None)
    if image is None or "cls" not in sample:
        raise DataError(f"shard sample {sample.get('__key__')} in {sample.get('__url__')} has no image or no class; shard again")
    return image, int(sample["cls"]), str(sample["__key__"])
