"""Scan an image folder or CSV manifest, split it, decode images and serve them as a torch Dataset."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from finetune.distributed import Ranks, shard
from finetune.errors import DataError
from finetune.recipe import DataConfig

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class DatasetIndex:
    """Every sample as a row of `samples` (path, label, split) plus the sorted class names."""

    samples: pd.DataFrame
    class_names: list[str]

    def split(self, name: str) -> pd.DataFrame:
        return self.samples[self.samples["split"] == name].reset_index(drop=True)

    def targets(self, frame: pd.DataFrame) -> list[int]:
        lookup = {name: i for i, name in enumerate(self.class_names)}
        return [lookup[label] for label in frame["label"]]


def _is_image(path: Path, extensions: Sequence[str]) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions


def list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files below `folder` (recursive, hidden files skipped), in sorted order."""
    return sorted(p for p in folder.rglob("*") if _is_image(p, extensions) and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _scan_classes(folder: Path, extensions: Sequence[str]) -> pd.DataFrame:
    rows = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows += [(str(path), class_dir.name) for path in list_images(class_dir, extensions)]
    return pd.DataFrame(rows, columns=["path", "label"])


def scan_image_folder(root: Path, *, extensions: Sequence[str]) -> pd.DataFrame:
    """Rows of (path, label, split); split is empty for a flat folder of class folders."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass --data with a folder of class sub-folders")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if "train" in subdirs and set(subdirs) <= set(SPLIT_NAMES):
        frames = []
        for name, folder in sorted(subdirs.items()):
            frame = _scan_classes(folder, extensions)
            frame["split"] = SPLIT_NAMES[name]
            frames.append(frame)
        samples = pd.concat(frames, ignore_index=True)
    else:
        samples = _scan_classes(root, extensions)
        samples["split"] = ""
    if samples.empty:
        raise DataError(
            f"no images found in {root}; expected class sub-folders (or train/ val/ holding them) with files ending in {', '.join(extensions)}"
        )
    return samples


def read_manifest(path: Path) -> pd.DataFrame:
    """A CSV with columns path,label (optional split); relative paths are relative to the CSV."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"manifest {path} is not a readable CSV: {exc}") from None
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise DataError(f"manifest {path} lacks column(s) {sorted(missing)}; it needs a header line 'path,label'")
    base = Path(path).parent
    frame["path"] = [str(p if Path(p).is_absolute() else base / p) for p in frame["path"]]
    if "split" not in frame.columns:
        frame["split"] = ""
    frame["split"] = [SPLIT_NAMES.get(s.strip().lower(), "") if s else "" for s in frame["split"]]
    absent = [p for p in frame["path"] if not Path(p).is_file()]
    if absent:
        raise DataError(f"manifest {path} names {len(absent)} missing file(s), first: {absent[0]}")
    return frame[["path", "label", "split"]]


def _groups(frame: pd.DataFrame, pattern: str | None) -> pd.Series | None:
    if pattern is None:
        return None
    regex = re.compile(pattern)
    keys = []
    for path in frame["path"]:
        match = regex.search(Path(path).name)
        if match is None:
            raise DataError(f"data.group_pattern '{pattern}' does not match file name {Path(path).name} ({path}); fix the pattern")
        keys.append(match.group(1) if match.groups() else match.group(0))
    return pd.Series(keys, index=frame.index)


def _stratified(frame: pd.DataFrame, fraction: float, seed: int, what: str, group_pattern: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    counts = frame["label"].value_counts()
    n_take = int(round(len(frame) * fraction))
    if n_take < counts.size or (counts < 2).any():
        small = counts.idxmin()
        raise DataError(
            f"cannot make a stratified {what} split: class '{small}' has {counts.min()} image(s) and the {what} set "
            f"would hold {n_take} for {counts.size} classes; add images or raise data.{what}_fraction"
        )
    groups = _groups(frame, group_pattern)
    if groups is None:
        keep, take = train_test_split(frame, test_size=n_take, stratify=frame["label"], random_state=seed)
        return keep, take
    folds = max(2, int(round(1.0 / fraction)))
    if groups.nunique() < folds:
        raise DataError(f"data.group_pattern gives {groups.nunique()} group(s); a {what} fraction of {fraction:.2f} needs at least {folds}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    keep_idx, take_idx = next(splitter.split(frame, frame["label"], groups))
    return frame.iloc[keep_idx], frame.iloc[take_idx]


def split_samples(samples: pd.DataFrame, *, val_fraction: float, test_fraction: float, seed: int, group_pattern: str | None = None) -> pd.DataFrame:
    """Assign train/val/test to rows without a split (stratified, seeded, groups kept together); pre-split rows are kept."""
    samples = samples.copy()
    if (samples["split"] != "").all():
        if not (samples["split"] == "val").any() and val_fraction > 0:
            train = samples[samples["split"] == "train"]
            keep, val = _stratified(train, val_fraction, seed, "val", group_pattern)
            samples.loc[val.index, "split"] = "val"
        return samples
    pool = samples[samples["split"] == ""]
    if test_fraction > 0:
        pool, test = _stratified(pool, test_fraction, seed, "test", group_pattern)
        samples.loc[test.index, "split"] = "test"
    if val_fraction > 0:
        pool, val = _stratified(pool, val_fraction / (1.0 - test_fraction), seed, "val", group_pattern)
        samples.loc[val.index, "split"] = "val"
    samples.loc[pool.index, "split"] = "train"
    return samples


def read_samples(cfg: DataConfig) -> pd.DataFrame:
    """Every (path, label, split) row of the folder or manifest named by `cfg.path`."""
    if cfg.path is None:
        raise DataError("no data given; pass --data PATH (a folder of class folders or a CSV manifest) or set data.path")
    path = Path(cfg.path)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise DataError(f"manifest {path} does not exist; check --data")
        return read_manifest(path)
    return scan_image_folder(path, extensions=[e.lower() for e in cfg.extensions])


def make_index(samples: pd.DataFrame, cfg: DataConfig, *, seed: int) -> DatasetIndex:
    """Split, and fix the sorted class order from the training split."""
    samples = split_samples(samples, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed, group_pattern=cfg.group_pattern)
    train_labels = set(samples.loc[samples["split"] == "train", "label"])
    if len(train_labels) < 2:
        raise DataError(f"{cfg.path}: training needs at least 2 classes, found {sorted(train_labels)}")
    unseen = sorted(set(samples["label"]) - train_labels)
    if unseen:
        raise DataError(f"{cfg.path}: class(es) {unseen} appear in val/test but have no training images")
    order = {"train": 0, "val": 1, "test": 2}
    samples = samples.sort_values(["split", "label", "path"], key=lambda c: c.map(order) if c.name == "split" else c)
    return DatasetIndex(samples=samples.reset_index(drop=True), class_names=sorted(train_labels))


def load_dataset_index(cfg: DataConfig, *, seed: int) -> DatasetIndex:
    """Scan (or read the manifest), split, and fix the sorted class order (no image is decoded)."""
    return make_index(read_samples(cfg), cfg, seed=seed)


def load_image(path: str | Path) -> np.ndarray:
    """Decode to an RGB uint8 array: EXIF orientation applied; grey, palette, alpha, 16-bit, CMYK converted.

    JPEGs go through OpenCV (1.5x faster than PIL here, same pixels: benchmarks/bench_data.py); anything
    OpenCV cannot read, and every other format, through PIL. Callers screen out truncated files first.
    """
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)  # IMREAD_COLOR applies the EXIF orientation
        if bgr is not None:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    try:
        with Image.open(path) as img:
            img.seek(0)  # first frame of GIF/TIFF stacks
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(img, dtype=np.float64)
                scale = 255.0 / 65535.0 if array.max() > 255 else 1.0
                img = Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), mode="L")
            elif img.mode in ("P", "PA") or (img.mode == "LA"):
                img = img.convert("RGBA")
            rgb = img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None


class ImageDataset(torch.utils.data.Dataset):
    """(tensor, class index) pairs; the transform is an albumentations Compose returning a tensor."""

    def __init__(self, paths: Sequence[str], targets: Sequence[int], transform: Callable) -> None:
        self.paths = list(paths)
        self.targets = list(targets)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.paths[index])
        return self.transform(image=image)["image"], self.targets[index]


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = torch.initial_seed() % 2**31
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def make_loader(
    dataset: ImageDataset, *, batch_size: int, num_workers: int, shuffle: bool, seed: int, pin_memory: bool = False, balanced: bool = False,
    ranks: Ranks | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose order and augmentation depend only on `seed` (so resume is exact).

    `balanced` draws with replacement, each class equally likely (a WeightedRandomSampler).
    Under torchrun (`ranks.enabled`) each rank reads its share: a DistributedSampler seeded with
    `seed` when shuffling (the same permutation on every rank), a strided slice otherwise.
    """
    ranks = ranks or Ranks()
    generator = torch.Generator().manual_seed(seed + 7919 * ranks.rank)  # augmentation differs per rank
    sampler = None
    if ranks.enabled:
        if balanced:
            raise DataError("data.sampler: weighted is not supported under torchrun; use sampler: shuffle with loss.class_weights")
        sampler = (torch.utils.data.DistributedSampler(dataset, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=seed)
                   if shuffle else shard(len(dataset), ranks))
        shuffle = False
    elif balanced:
        counts = np.bincount(dataset.targets)
        weights = torch.as_tensor([1.0 / counts[t] for t in dataset.targets], dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(dataset), replacement=True, generator=generator)
        shuffle = False
    if num_workers == 0 and hasattr(dataset.transform, "set_random_seed"):
        dataset.transform.set_random_seed(seed + 7919 * ranks.rank)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers else None,
        pin_memory=pin_memory,
        drop_last=False,
    )
